"""The needle heatmap: prompt layout, scoring by exact match, resuming, effective length, reach, the plot."""

import pytest
import torch

from hf_longctx import patch
from hf_longctx.demo import ByteTokenizer
from hf_longctx.evaluation.needle import (
    NEEDLE,
    Needle,
    NeedleCell,
    effective_length,
    haystack_tokens,
    make_needles,
    mean_scores,
    min_needle_length,
    needle_grid,
    needle_prompt,
    reach,
)
from hf_longctx.evaluation.report import plot_needle
from hf_longctx.testing import tiny_model

from test_evaluation import StubLM, lookback_copier

TOKENIZER = ByteTokenizer()
HAY = haystack_tokens(TOKENIZER)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_prompt_has_the_exact_length_and_places_the_needle(depth):
    needle = Needle("amber-falcon", "1234567")
    ids, answer_tokens = needle_prompt(TOKENIZER, HAY, 900, depth, needle)
    assert len(ids) == 900
    text = TOKENIZER.decode(ids)
    assert text.endswith("The special magic number for amber-falcon is 1234567")
    assert TOKENIZER.decode(ids[-answer_tokens:]) == " 1234567"
    line = NEEDLE.format(word="amber-falcon", value="1234567")
    assert text.count(line) == 1
    lines = text.split("\n")
    hay = 900 - min_needle_length(TOKENIZER, [needle])  # haystack tokens (bytes)
    before = len(text[: text.index(line)]) - len(lines[0]) - 2  # after the task line and its separator
    assert before == round(depth * hay)


def test_too_short_a_length_and_bad_depths_are_refused():
    needle = make_needles(1)[0]
    shortest = min_needle_length(TOKENIZER, [needle])
    assert len(needle_prompt(TOKENIZER, HAY, shortest, 0.5, needle)[0]) == shortest
    with pytest.raises(ValueError, match="at least"):
        needle_prompt(TOKENIZER, HAY, shortest - 1, 0.5, needle)
    with pytest.raises(ValueError, match="depth"):
        needle_prompt(TOKENIZER, HAY, 900, 1.5, needle)
    with pytest.raises(ValueError, match="needles per cell"):
        make_needles(0)


def test_needles_are_distinct_and_seeded():
    needles = make_needles(5, seed=1)
    assert len({n.word for n in needles}) == 5 and all(len(n.value) == 7 for n in needles)
    assert make_needles(5, seed=1) == needles and make_needles(5, seed=2) != needles


def test_a_cell_scores_the_needles_the_model_can_see():
    # The copier looks back 300 bytes: at depth 1 the needle line ends right before the question (found);
    # at depth 0 it sits ~1000 bytes back (not found).
    model = StubLM(lookback_copier(window=300))
    cells = needle_grid(model, TOKENIZER, [1200], [0.0, 1.0], needles=3, haystack=HAY)
    values = [n.value for n in make_needles(3)]
    assert [(c.length, c.depth, c.score, c.needles) for c in cells] == [(1200, 0.0, 0.0, 3), (1200, 1.0, 100.0, 3)]
    assert cells[1].answers == values and cells[1].values == values and cells[1].exact == 100.0
    assert cells[0].answers != values


def test_finished_cells_are_not_run_again_and_new_ones_are_handed_over():
    model = StubLM(lookback_copier(window=300))
    stored = NeedleCell(length=1200, depth=0.0, score=42.0, needles=2)
    saved = []
    cells = needle_grid(model, TOKENIZER, [1200], [0.0, 1.0], needles=2, haystack=HAY,
                        done=lambda n, d: stored if d == 0.0 else None, on_cell=saved.append)  # fmt: skip
    assert cells[0] is stored and [c.depth for c in saved] == [1.0] and cells[1] is saved[0]
    model.inputs.clear()
    again = needle_grid(model, TOKENIZER, [1200], [0.0, 1.0], needles=2, haystack=HAY,
                        done=lambda n, d: {0.0: stored, 1.0: saved[0]}[d])  # fmt: skip
    assert again == cells and model.inputs == []


def test_shared_prefix_gives_what_fresh_prompts_give():
    model = patch(tiny_model("llama", seed=2), {"rope": {"type": "yarn", "factor": 2}})
    kwargs = dict(needles=2, haystack=HAY)
    shared = needle_grid(model, TOKENIZER, [400], [0.0, 0.5, 1.0], share_prefix=True, **kwargs)
    fresh = needle_grid(model, TOKENIZER, [400], [0.0, 0.5, 1.0], share_prefix=False, **kwargs)
    assert [c.to_dict() for c in shared] == [c.to_dict() for c in fresh]
    dynamic = patch(tiny_model("llama"), {"rope": {"type": "dynamic", "factor": 2}})
    with pytest.raises(ValueError, match="changes its frequencies"):
        needle_grid(dynamic, TOKENIZER, [400], [0.0], share_prefix=True, **kwargs)


def rows(scores: dict[int, list[float]]) -> list[dict]:
    depths = [0.0, 0.5, 1.0]
    return [{"length": n, "depth": d, "score": s} for n, values in scores.items() for d, s in zip(depths, values)]


def test_effective_length_is_the_longest_length_that_stays_above_the_threshold():
    grid = rows({4096: [100, 100, 100], 8192: [100, 100, 67], 16384: [0, 100, 0], 32768: [100, 100, 100]})
    assert mean_scores(grid) == {4096: 100.0, 8192: pytest.approx(89.0), 16384: pytest.approx(100 / 3), 32768: 100.0}
    assert effective_length(grid) == 8192  # 89 >= 85.6; 16k falls below, so 32k does not count
    assert effective_length(grid, threshold=90) == 4096
    assert effective_length(grid, threshold=30) == 32768
    assert effective_length(rows({4096: [0, 100, 100]})) is None
    assert effective_length(list(reversed(grid))) == 8192  # the order of the rows does not matter


def test_reach_of_each_method():
    model = tiny_model("llama")
    trained = model.config.max_position_embeddings
    assert reach(model)[0] == trained
    assert reach(patch(tiny_model("llama"), "yarn-4x"))[0] == 4 * trained
    assert reach(patch(tiny_model("llama"), {"rope": {"type": "dynamic", "factor": 4}}))[0] is None
    extend = {"extend": {"method": "self_extend", "group_size": 4, "window": 16}}
    assert reach(patch(tiny_model("llama"), extend))[0] == (trained - 16) * 4 + 16
    wide = {"extend": {"method": "self_extend", "group_size": 4, "window": 1024}}
    assert reach(patch(tiny_model("llama"), wide))[0] == trained  # the window alone covers every trained position
    dual = {"extend": {"method": "dual_chunk", "chunk_size": trained, "local_size": 16}}
    assert reach(patch(tiny_model("llama"), dual))[0] is None


def test_heatmap_is_a_png(tmp_path):
    path = plot_needle(rows({4096: [100, 50, 0], 8192: [0, 0, 100]}), tmp_path / "h.png", threshold=85.6,
                       trained_length=4096)  # fmt: skip
    assert path.read_bytes()[:4] == b"\x89PNG"
