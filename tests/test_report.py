"""`align report`: one self-contained HTML file with lineage, curves, the reward-KL frontier and escaped samples."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import REPO
from markupsafe import escape  # the template engine's escaping: ' is &#39;, not html.escape's &#x27;

from align.artifacts import Artifact, Registry
from align.eval_result import EvalExample, EvalResult, EvalSettings, EvalSide
from align.recipe import DpoSection, GrpoSection, PpoSection
from align.report.extract import curve_group, curve_series, frontier_series, group_curves
from align.report.html import render_samples
from align.report.plots import plot_curves, plot_frontier
from align.stages import STAGES
from bench.report_screenshot import find_chromium, screenshot

STORY_PROMPTS = REPO / "data_cards" / "tiny-story-prompts.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- helpers -------------------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Collects every tag with its attributes; `HTMLParser` raises nothing, so also track unbalanced tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature, every chunk's CRC and that IDAT inflates fully."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    offset, chunks, idat = 8, [], b""
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r} chunk"
        chunks.append(kind)
        idat += body if kind == b"IDAT" else b""
        offset += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND", chunks
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    assert len(zlib.decompress(idat)) >= height * (width + 1)  # at least one byte per pixel plus row filters
    return width, height


def embedded_pngs(page: _Page) -> list[bytes]:
    prefix = "data:image/png;base64,"
    return [base64.b64decode(attrs["src"][len(prefix):], validate=True) for tag, attrs in page.tags
            if tag == "img" and (attrs.get("src") or "").startswith(prefix)]


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_registry(dpo_artifact: Path, reward_artifact: Path, sft_registry: Path,
                       run_align: Callable) -> Path:
    """The session registry with a small `align eval` of tiny-dpo (so the frontier and samples have data)."""
    result = run_align("eval", "tiny-dpo@latest", "--data", STORY_PROMPTS, "--reward", "tiny-rm@latest",
                       "--limit", "8", "--num-samples", "2", "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (dpo_artifact / "eval.json").is_file()
    return sft_registry


@pytest.fixture(scope="module")
def full_report(evaluated_registry: Path, run_align: Callable, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`align report` of the whole registry (latest version of every name)."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = run_align("report", "--registry", evaluated_registry, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(out) in result.stdout.replace("\n", "")
    return out


# ---- the whole report ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_is_self_contained_html_with_real_pngs(full_report: Path) -> None:
    text = full_report.read_text(encoding="utf-8")
    page = parse_page(text)
    assert text.startswith("<!DOCTYPE html>") and [t for t, _ in page.tags][:1] == ["html"]
    pngs = embedded_pngs(page)
    # lineage + curves of tiny-sft, tiny-rm, tiny-dpo (tiny-pairs is a dataset) + the frontier
    assert len(pngs) >= 5, len(pngs)
    for png in pngs:
        width, height = png_size(png)
        assert width >= 200 and height >= 100
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "data", "action"):
            value = (attrs.get(name) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "file:")), (tag, name, value[:80])
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe")]
    assert "http://" not in text and "https://" not in text and "@import" not in text


@pytest.mark.slow
def test_report_names_every_artifact_its_lineage_cards_and_samples(full_report: Path,
                                                                    evaluated_registry: Path) -> None:
    text = full_report.read_text(encoding="utf-8")
    registry = Registry(evaluated_registry)
    latest = [registry.resolve(name) for name in registry.names()]
    for artifact in latest:
        assert f'id="artifact-{artifact.name}-v{artifact.version}"' in text, artifact.ref
        for card in artifact.manifest.data:
            assert escape(card.name) in text
    lineage = text[text.index('id="lineage"'):text.index('id="artifacts"')]
    # tiny-dpo's chain in the accessible list: tiny-dpo -> model tiny-sft@v2, data tiny-pairs@v1 -> tiny-sft@v2.
    assert re.search(r"<li><code>tiny-dpo@v1</code> \[dpo\].*<ul><li><span class=\"role\">model:</span> "
                     r"<code>tiny-sft@v2</code>", lineage)
    assert "<code>tiny-pairs@v1</code> [pairs]" in lineage and "stories260K</code>" in lineage  # text, not the PNG
    result = json.loads((evaluated_registry / "tiny-dpo" / "v1" / "eval.json").read_text())
    for example in result["examples"][:3]:
        assert escape(example["artifact"]) in text and escape(example["parent"]) in text
    comparison = text[text.index('id="comparison"'):text.index('id="samples"')]
    assert f"{result['policy']['judge']:.3f} ± {result['policy']['judge_stderr']:.3f}" in comparison
    assert f"{result['kl']:.3f}" in comparison and "tiny-rm@v1" not in comparison  # only policies are compared


@pytest.mark.slow
def test_ref_filter_includes_only_the_asked_artifacts(evaluated_registry: Path, run_align: Callable,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "rm.html"
    result = run_align("report", "tiny-rm@v1", "tiny-rm", "--registry", evaluated_registry, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert re.findall(r'<section class="artifact" id="([^"]+)"', text) == ["artifact-tiny-rm-v1"]
    assert "tiny-dpo" not in text and "tiny-sft@v1" not in text  # neither asked for nor an ancestor
    assert "<code>tiny-sft@v2</code>" in text  # the ancestor still shows in the lineage
    assert 'id="comparison"' not in text  # tiny-rm has no eval.json


@pytest.mark.slow
def test_unknown_ref_exits_2(evaluated_registry: Path, run_align: Callable, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    result = run_align("report", "tiny-dpo@v9", "--registry", evaluated_registry, "--out", out)
    assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr
    assert "tiny-dpo@v9 does not exist" in result.stderr and not out.exists()


@pytest.mark.slow
def test_a_damaged_eval_json_is_an_error_naming_the_file_and_field(evaluated_registry: Path, run_align: Callable,
                                                                   tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(evaluated_registry / "tiny-dpo", registry / "tiny-dpo", ignore=shutil.ignore_patterns(".*"))
    damaged = registry / "tiny-dpo" / "v1" / "eval.json"
    result = json.loads(damaged.read_text())
    del result["judge_delta"]
    damaged.write_text(json.dumps(result))
    out = tmp_path / "r.html"
    result = run_align("report", "--registry", registry, "--out", out)
    assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr
    assert f"{damaged}: field judge_delta" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_empty_registry_and_unwritable_out_are_clear_errors(run_align: Callable, tmp_path: Path) -> None:
    result = run_align("report", "--registry", tmp_path / "empty", "--out", tmp_path / "r.html")
    assert result.returncode == 2 and "has no artifacts yet" in result.stderr, result.stderr
    (tmp_path / "afile").write_text("x")
    result = run_align("report", "--registry", tmp_path / "empty", "--out", tmp_path / "afile" / "r.html")
    assert result.returncode == 2 and "cannot write the report" in result.stderr, result.stderr
    result = run_align("report", "--registry", tmp_path / "empty", "--out", tmp_path)
    assert result.returncode == 2 and "is a directory" in result.stderr, result.stderr


# ---- units ---------------------------------------------------------------------------------------------------


def test_samples_are_html_escaped() -> None:
    evil = "<script>alert('x')</script> & \"quotes\""
    example = EvalExample(prompt=evil, parent="<b>bold</b>", artifact="</td></tr><img src=x onerror=alert(1)>",
                          judge_parent=0.25, judge_artifact=0.5)
    rendered = render_samples("tiny-<dpo>@v1", _result("vader", 1.0, 0.2).model_copy(update={"examples": [example]}))
    assert "<script>" not in rendered and "<b>" not in rendered and "<img" not in rendered and "<dpo>" not in rendered
    assert escape(evil) in rendered and "&lt;img src=x onerror=alert(1)&gt;" in rendered
    page = parse_page(rendered)
    assert [t for t, _ in page.tags].count("tr") == 2  # header + one example: the injected </tr> did not split it
    assert "judge +0.500" in rendered and "judge +0.250" in rendered


def test_any_numeric_log_key_is_plotted_in_a_sensible_panel() -> None:
    # PPO-style keys the report was not written for, plus the noise a log history carries.
    history = [{"step": s, "reward": 0.1 * s, "score": s / 3, "kl": 0.01 * s, "kl_coef": 0.05, "entropy": 2.0,
                "policy_loss": 1 / s, "value_loss": 2 / s, "clipfrac": 0.1, "approx_kl": 0.001,
                "response_length": 30 + s, "tokens_per_second": 900.0, "brand_new_metric": s % 3,
                "note": "text", "flag": True, "bad": float("nan"), "epoch": s / 10} for s in range(1, 6)]
    history += [{"step": 5, "eval_loss": 0.7, "eval_runtime": 1.0},
                {"step": 5, "train_runtime": 9.0, "train_loss": 0.5, "total_flos": 1.0}]
    series = curve_series(history)
    assert "note" not in series and "flag" not in series and "bad" not in series and "epoch" not in series
    assert "train_loss" not in series and "eval_runtime" not in series  # summary and bookkeeping
    assert series["reward"][0] == (1.0, 0.1) and len(series["policy_loss"]) == 5
    groups = group_curves(series)
    assert set(groups["losses"]) == {"policy_loss", "value_loss", "eval_loss"}
    assert set(groups["KL"]) == {"kl", "kl_coef", "approx_kl"}
    assert set(groups["rewards / scores"]) == {"reward", "score"}
    assert set(groups["lengths"]) == {"response_length"} and set(groups["other"]) == {"brand_new_metric"}
    assert curve_group("rewards/accuracies") == curve_group("eval_mean_token_accuracy") == "accuracies / win rates"
    assert curve_group("eval_rewards/margins") == "margins" and curve_group("clipfrac") == "fractions"
    assert curve_group("iteration") == "other"  # "ratio" counts only as a whole word
    assert curve_group("completions/mean_length") == "lengths" and curve_group("sparkle") == "other"
    assert png_size(plot_curves(groups, "ppo"))[0] > 600


# ---- rendering -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chromium_renders_the_report(full_report: Path, tmp_path: Path) -> None:
    if not Path("/usr/bin/chromium").exists() and find_chromium() is None:
        pytest.skip("no Chromium (/usr/bin/chromium) to render the report headless")
    png = screenshot(full_report, tmp_path / "report.png", width=1280, height=3000).read_bytes()
    assert png_size(png) == (1280, 3000)
    assert len(png) > 50_000  # plots and tables, not a blank page


def _evaluated(tmp_path: Path, name: str, stage: str, section: object, result: EvalResult) -> tuple:
    """A policy artifact (its stage's manifest with the stage's settings) with an eval.json, read back as
    `align report` reads it."""
    path = tmp_path / name / "v1"
    path.mkdir(parents=True)
    result.model_copy(update={"artifact": f"{name}@v1"}).write(path / "eval.json")
    settings = {stage: section} if section is not None else {}
    manifest = STAGES[stage].manifest.model_construct(name=name, version=1, stage=stage, **settings)
    loaded = EvalResult.of(path)
    assert loaded is not None
    return Artifact(name=name, version=1, path=path, manifest=manifest), loaded


def _result(judge: str, kl: float | None, rise: float, reward: tuple[float, float] | None = None) -> EvalResult:
    """A complete eval.json: the policy `rise` above its parent's judge score 0.3, with reward scores (policy,
    parent) when a reward model was given; KL null as after greedy decoding when `kl` is None."""
    def side(judge_score: float, reward_score: float | None, reward_stderr: float) -> EvalSide:
        return EvalSide(judge=judge_score, judge_stderr=0.02, length_tokens=30.0, distinct_2=0.6,
                        ref_nll_per_token=2.5, truncated_share=0.1, reward=reward_score,
                        reward_stderr=None if reward_score is None else reward_stderr)

    policy_reward, parent_reward = reward or (None, None)
    return EvalResult(
        schema_version=EvalResult.SCHEMA_VERSION, artifact="policy@v1", parent="tiny-sft@v2",
        settings=EvalSettings(card="tiny-story-prompts", judge=judge, reward="tiny-rm@v1" if reward else None),
        prompts=64, samples=256, policy=side(0.3 + rise, policy_reward, 0.03),
        parent_model=side(0.3, parent_reward, 0.04), judge_delta=rise, judge_delta_stderr=0.01,
        reward_delta=None if reward is None else reward[0] - reward[1],
        reward_delta_stderr=None, kl=kl, kl_stderr=None if kl is None else 0.5,
        kl_per_token=None if kl is None else kl / 30, kl_note="not measured: greedy decoding" if kl is None else None,
        ref_nll_rise=0.1, win_rate=0.5, win_rate_stderr=0.05, win_rate_by=judge, examples=[])


def test_frontier_groups_points_per_judge_and_per_stage_in_kl_order(tmp_path: Path) -> None:
    keyword = "bench.objectives:keyword_count"
    evals = [
        _evaluated(tmp_path, "dpo-a", "dpo", DpoSection(beta=0.1), _result("vader", 5.0, 0.4)),
        _evaluated(tmp_path, "ppo-a", "ppo", PpoSection(kl_coef=0.1, reward_model="tiny-rm@v1"),
                   _result("vader", 3.0, 0.3, reward=(1.5, 0.5))),
        _evaluated(tmp_path, "dpo-b", "dpo", DpoSection(beta=0.3), _result("vader", 2.0, 0.2)),
        _evaluated(tmp_path, "grpo-a", "grpo", GrpoSection(beta=0.03, reward_function=keyword),
                   _result(keyword, 8.0, 1.1)),
        _evaluated(tmp_path, "grpo-b", "grpo", GrpoSection(beta=0.1, reward_function=keyword),
                   _result(keyword, 4.0, 0.6)),
        _evaluated(tmp_path, "ppo-greedy", "ppo", PpoSection(kl_coef=0.3, reward_model="tiny-rm@v1"),
                   _result(keyword, None, 0.5)),  # no KL: skipped
        _evaluated(tmp_path, "sft-b", "sft", None, _result("reward:tiny-rm@v1", 1.0, 0.15)),  # no coefficient
    ]

    panels = frontier_series(evals)
    assert list(panels) == [f"judge {keyword}", "judge reward:tiny-rm@v1", "judge vader", "reward model tiny-rm@v1"]
    vader = panels["judge vader"]
    assert list(vader) == ["dpo", "ppo"]  # stages in a fixed order, one line each
    assert [p.ref for p in vader["dpo"]] == ["dpo-b@v1", "dpo-a@v1"]  # joined in KL order, not eval order
    assert [(p.kl, p.rise, p.rise_stderr, p.label) for p in vader["dpo"]] == [(2.0, 0.2, 0.01, "β=0.3"),
                                                                               (5.0, 0.4, 0.01, "β=0.1")]
    assert vader["ppo"][0].label == "kl_coef=0.1" and vader["ppo"][0].parent_score == 0.3
    assert [p.ref for p in panels[f"judge {keyword}"]["grpo"]] == ["grpo-b@v1", "grpo-a@v1"]
    assert "ppo" not in panels[f"judge {keyword}"]  # kl null: not on the frontier
    (sft_point,) = panels["judge reward:tiny-rm@v1"]["sft"]
    assert sft_point.rise == pytest.approx(0.15) and sft_point.rise_stderr == 0.01 and sft_point.label == "sft-b@v1"
    (reward_point,) = panels["reward model tiny-rm@v1"]["ppo"]
    assert reward_point.rise == 1.0 and reward_point.rise_stderr == pytest.approx(0.05)  # 0.03, 0.04 in quadrature

    width, height = png_size(plot_frontier(panels))
    assert width > 1200 and height > 600  # 4 panels: 3 columns x 2 rows
    assert png_size(plot_frontier(frontier_series([evals[5]])))[0] > 300  # nothing to place: still an image, saying so
