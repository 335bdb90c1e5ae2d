"""Controllability: control-prompt search (greedy, GCG), its verification, the singular-value
bound, sessions, interrupts and the %%reach magic."""

from __future__ import annotations

import copy
import math
import random
import sys

import pytest
import torch

import promptscope
from promptscope.analyses.reach_bound import (
    BoundUnsupported,
    attention_bound,
    nothing_new_reachable,
)
from promptscope.analyses.reachability import ReachabilityError, heldout_states, k_epsilon
from promptscope.errors import CapabilityError
from promptscope.models.base import Model
from promptscope.models.hf import HFModel
from promptscope.organism import grammar

STATES = ["Is Paris in Europe?", "The cat sat on"]
FAST = {"steps": 3, "search_width": 16, "top_k": 8, "progress": False}


def _argmax_after(model: HFModel, x0: str, control_ids: list[int]) -> int:
    """Independent check: one plain forward pass on BOS + u + x0, no batching or padding."""
    ids = model.encode_prompt(x0)
    bos = model.tokenizer.bos_token_id
    full = ([ids[0], *control_ids, *ids[1:]] if bos is not None and ids[:1] == [bos]
            else [*control_ids, *ids])
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([full])).logits[0, -1]
    return int(logits.argmax())


@pytest.fixture(scope="module")
def organism():
    return promptscope.load_model("organism", make_default=False)


@pytest.fixture(scope="module")
def both_run(tiny_llama):
    return promptscope.reachability(tiny_llama, STATES, "top:3,random:2", k_max=2,
                                    method="both", save=False, **FAST)


def test_every_reported_control_makes_the_target_the_argmax(both_run, tiny_llama):
    df = both_run.df
    assert len(df) == len(STATES) * 5 and set(df["target_set"]) == {"top", "random"}
    for row in df[df["reached"]].itertuples():
        assert len(row.control_ids) == row.k <= 2
        assert _argmax_after(tiny_llama, row.x0, list(row.control_ids)) == row.target_id
        assert row.rank == 1
    for row in df[~df["reached"]].itertuples():  # best attempt reported, honestly not argmax
        assert row.rank > 1 and len(row.control_ids) <= 2
    assert both_run.params["unverified_claims"] >= 0


def test_argmax_target_is_reached_with_k0(both_run):
    df = both_run.df
    top1 = df[df["base_rank"] == 1]
    assert len(top1) == len(STATES)  # the argmax of each x0 is in its top:3
    assert (top1["reached"] & (top1["k"] == 0) & (top1["control"] == "")).all()
    assert not ((df["k"] == 0) & (df["base_rank"] > 1)).any()


def test_k_epsilon_table_and_figures(both_run):
    table = k_epsilon(both_run.df, 2)
    assert list(table["k"].unique()) == [0, 1, 2]
    top = table[table["target_set"] == "top"].set_index("k")["reached"]
    assert top.is_monotonic_increasing and top[0] == pytest.approx(1 / 3)
    fig = both_run.figure()
    names = [t.name for t in fig.data]
    assert any("paper" in (n or "") for n in names) and any("top" in (n or "") for n in names)
    assert f"{both_run.df['pair'].nunique()} (x0, target) pairs" in fig.layout.title.text
    from promptscope.viz.reachability import rank_figure

    assert len(rank_figure(both_run).data) >= 1
    assert set(both_run.summary()["target_set"]) == {"top", "random"}
    assert {"pair", "step", "rank", "loss"} <= set(both_run.tables["trace"].columns)


def test_organism_single_token_controls_are_verified(organism):
    # Mid-sentence states (no topic marker yet): a one-token control that names a topic can
    # make that topic's successor the most likely next word.
    rng = random.Random(5)
    x0s = [" ".join(grammar.words_of(grammar.text(rng, 1))[2:4]) for _ in range(3)]
    run = promptscope.reachability(organism, x0s, "top:6", k_max=1, method="gcg",
                                   bound=False, save=False, progress=False)
    reached = run.df[run.df["reached"] & (run.df["k"] == 1)]
    assert len(reached) >= 1  # the organism's language is controllable with one token
    for row in reached.itertuples():
        assert _argmax_after(organism, row.x0, list(row.control_ids)) == row.target_id


def test_true_targets_from_heldout_text(tiny_llama):
    states = heldout_states(tiny_llama, ["The capital of France is Paris. The cat sat on the "
                                         "mat. A dog ran in the park."], n=2, min_tokens=3)
    assert len(states) == 2
    run = promptscope.reachability(tiny_llama, states, "true", k_max=1, method="gcg",
                                   bound=False, save=False, progress=False)
    assert list(run.df["target_id"]) == [s[1] for s in states]
    assert set(run.df["target_set"]) == {"true"}


def test_targets_per_x0_and_fixed_length(tiny_llama):
    run = promptscope.reachability(tiny_llama, STATES, [[40], [41, 42]], k_min=2, k_max=2,
                                   init_control=[7, 7], method="gcg", bound=False, save=False,
                                   **FAST)
    assert list(zip(run.df.sort_values("pair")["state"], run.df.sort_values("pair")["target_id"])) \
        == [(0, 40), (1, 41), (1, 42)]
    got = run.df[run.df["reached"] & (run.df["base_rank"] > 1)]
    assert (got["k"] == 2).all()  # k_min=2: no shorter prompt is tried


def test_zeroed_model_bound_and_search_agree_nothing_new_is_reachable(tiny_llama):
    zeroed = HFModel(copy.deepcopy(tiny_llama.model), tiny_llama.tokenizer, name="zeroed")
    with torch.no_grad():
        for layer in zeroed.model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    bound = attention_bound(zeroed, STATES, k=[1, 2])
    assert nothing_new_reachable(bound) and (bound["shift_bound"] == 0).all()
    assert not nothing_new_reachable(attention_bound(tiny_llama, STATES, k=2))
    run = promptscope.reachability(zeroed, STATES, "top:3,random:3", k_max=2, method="both",
                                   save=False, **FAST)
    assert nothing_new_reachable(run.tables["bound"])
    assert (run.df["reached"] == (run.df["base_rank"] == 1)).all()
    assert (run.df.loc[run.df["reached"], "k"] == 0).all()


def test_bound_columns_on_the_organism(organism):
    bound = attention_bound(organism, ["tike lara fohi"], k=[1, 4])
    assert len(bound) == 2 * 4 * 4  # k x layers x heads
    assert ((bound["beta"] > 0) & (bound["beta"] <= 1)).all()
    assert (bound["sigma_q"] > 0).all() and (bound["control_bound"] >= 0).all()
    b1 = bound[bound["k"] == 1].reset_index()
    b4 = bound[bound["k"] == 4].reset_index()
    assert (b4["beta"] >= b1["beta"]).all()  # more control tokens, more attention they can take


class _APIModel(Model):
    name = "api"
    capabilities = frozenset({"score", "generate"})

    def score(self, prompts, continuations, progress=None):  # pragma: no cover
        raise NotImplementedError

    def generate(self, prompts, **kwargs):  # pragma: no cover
        raise NotImplementedError


def test_errors_say_what_to_fix(tiny_llama):
    with pytest.raises(ReachabilityError, match="at least 1 token"):
        promptscope.reachability(tiny_llama, STATES, "top:2", k_max=0, save=False)
    with pytest.raises(ReachabilityError, match="single next tokens"):
        promptscope.reachability(tiny_llama, STATES, ["The capital of France"], save=False)
    with pytest.raises(ReachabilityError, match="pairs"):
        promptscope.reachability(tiny_llama, STATES, "true", save=False)
    with pytest.raises(ReachabilityError, match="to mix them pass a list"):
        promptscope.reachability(tiny_llama, STATES, "top:3, the", save=False)
    with pytest.raises(ReachabilityError, match="'top:x'"):
        promptscope.reachability(tiny_llama, STATES, "top:x", save=False)
    with pytest.raises(ReachabilityError, match="method"):
        promptscope.reachability(tiny_llama, STATES, "top:2", method="beam", save=False)
    with pytest.raises(ReachabilityError, match="init_control"):
        promptscope.reachability(tiny_llama, STATES, "top:2", k_min=2, k_max=2,
                                 init_control=[5], save=False)
    special = tiny_llama.tokenizer.eos_token_id
    with pytest.raises(ReachabilityError, match="not control tokens"):
        promptscope.reachability(tiny_llama, STATES, "top:2", k_min=2, k_max=2,
                                 init_control=[5, special], method="gcg", save=False)
    with pytest.raises(ReachabilityError, match="method='greedy'"):
        promptscope.reachability(tiny_llama, STATES, "top:2", k_min=1, k_max=1,
                                 init_control=[5], method="greedy", save=False)
    with pytest.raises(CapabilityError, match="next-token log-probabilities"):
        promptscope.reachability(_APIModel(), STATES, "top:2", save=False)
    with pytest.raises(CapabilityError, match="gradients"):
        promptscope.reachability(_APIModel(), STATES, "top:2", method="gcg", save=False)


def test_interrupt_keeps_found_rows_in_the_session(tiny_llama):
    seen: list[dict] = []
    with pytest.raises(KeyboardInterrupt) as info:
        promptscope.reachability(tiny_llama, STATES, "top:3,random:3", k_max=2, method="gcg",
                                 on_pair=seen.append, should_stop=lambda: len(seen) >= 2,
                                 **FAST)
    partial = info.value.partial_result
    assert partial.status == "interrupted"
    # every pair is listed: the finished ones, and the rest as not reached (yet)
    df = partial.df
    assert df["complete"].sum() == len(seen) >= 2 and (~df["complete"]).sum() > 0
    assert df.groupby("target_set").size().to_dict() == {"top": 6, "random": 6}
    stopped = df[~df["complete"]]
    assert (stopped["method"] == "stopped").all() and not stopped["reached"].any()
    eps = k_epsilon(df, k_max=2)
    assert (eps["reached"] < 1).all()  # not a curve of the successes only
    loaded = promptscope.load(partial.session_id)
    assert loaded.status == "interrupted" and len(loaded.df) == len(partial.df)
    assert {"time_s", "unverified_claims"} <= set(loaded.params)


def test_a_pair_stopped_before_its_search_reports_its_state_without_control(tiny_llama):
    """Stopped before the first step, every pair's best attempt is no control at all: its
    probability and rank are its base ones, not 0 (a rank of 0 read as better than argmax)."""
    with pytest.raises(KeyboardInterrupt) as info:
        promptscope.reachability(tiny_llama, STATES, "random:2", k_max=2, method="gcg",
                                 should_stop=lambda: True, bound=False, **FAST)
    df = info.value.partial_result.df
    assert (df["method"] == "stopped").all() and (df["control"] == "").all()
    assert (df["rank"] == df["base_rank"]).all() and (df["prob"] == df["base_prob"]).all()
    assert (df["rank"] > 1).all()


def test_targets_as_tensors_arrays_and_texts_with_a_bar(tiny_llama):
    import numpy as np

    from promptscope.analyses.reachability import _split_targets

    ids = tiny_llama.model(torch.tensor([tiny_llama.encode_prompt(STATES[1])])).logits[0, -1] \
        .topk(3).indices
    for given in (ids, ids.numpy(), list(ids.numpy())):
        run = promptscope.reachability(tiny_llama, STATES[1:], given, k_max=1, method="greedy",
                                       bound=False, progress=False)
        assert sorted(run.df["target_id"]) == sorted(ids.tolist())
        assert promptscope.load(run.session_id).params["targets"] == ids.tolist()
    one = promptscope.reachability(tiny_llama, STATES[1:], np.int64(int(ids[0])), k_max=1,
                                   method="greedy", bound=False, save=False, progress=False)
    assert one.df["target_id"].tolist() == [int(ids[0])]
    # '|' separates token texts in a string; a list's items are taken as they are
    assert _split_targets(" Paris| Rome") == [" Paris", " Rome"]
    assert _split_targets([" |", "top:2", 5]) == [" |", "top:2", 5]
    with pytest.raises(ReachabilityError, match="empty token text"):
        _split_targets(" |")
    with pytest.raises(ReachabilityError, match="3 lists .* for 2 x0s"):
        promptscope.reachability(tiny_llama, STATES, [[40], [41], [42]], save=False)


def test_top_targets_come_from_tokens_with_a_known_score(tiny_llama):
    """An API model scores only the server's top tokens (the rest -inf), and a special token
    among them is no target: top:N never fills up with unscored tokens."""
    from promptscope.analyses.reachability import _Search

    search = _Search(tiny_llama, None, 0)
    states, true_next = search.parse_states(STATES[:1])
    logits = torch.full((search.vocab,), -math.inf)
    eos = tiny_llama.tokenizer.eos_token_id
    for rank, tid in enumerate([eos, 40, 41, 42]):
        logits[tid] = -float(rank)
    pairs = search.resolve_targets("top:3", states, true_next, [logits])
    assert [p.target for p in pairs] == [40, 41, 42]
    with pytest.raises(ReachabilityError, match="only 3 of the tokens"):
        search.resolve_targets("top:4", states, true_next, [logits])


def test_k_epsilon_leaves_lengths_a_fixed_k_run_did_not_try_empty(tiny_llama):
    run = promptscope.reachability(tiny_llama, STATES, [[40], [41, 42]], k_min=2, k_max=2,
                                   init_control=torch.tensor([7, 7]), method="gcg", bound=False,
                                   save=False,
                                   **FAST)
    table = k_epsilon(run.df, 2, 2).set_index(["target_set", "k"])["reached"]
    assert table.isna().tolist() == [False, True, False]  # k = 0, 1 (not tried), 2
    # the Result itself: the run's k_max and k_min (rows alone stopped at the longest found)
    assert k_epsilon(run).equals(k_epsilon(run.df, 2, 2))
    assert run.summary()["reached_k<=1"].isna().all()  # one token was never tried
    trace = next(t for t in run.figure().data if t.name and t.name.startswith("given"))
    assert math.isnan(trace.y[1]) and not math.isnan(trace.y[2])


def test_a_target_two_sets_ask_for_is_searched_once_and_counted_in_both(tiny_llama):
    states = heldout_states(tiny_llama, ["The capital of France is Paris. The cat sat on the "
                                         "mat. A dog ran in the park."], n=2, min_tokens=3)
    top1 = [int(tiny_llama.model(torch.tensor([tiny_llama.encode_prompt(t)])).logits[0, -1]
                .argmax()) for t, _ in states]
    states = [(t, top) for (t, _), top in zip(states, top1)]  # the true token is the argmax
    run = promptscope.reachability(tiny_llama, states, "true,top:2", k_max=1, method="greedy",
                                   bound=False, save=False, progress=False)
    assert run.df.groupby("target_set").size().to_dict() == {"true": 2, "top": 4}
    assert run.df["pair"].nunique() == 4  # the shared (x0, y) searched once
    at0 = k_epsilon(run.df).set_index(["target_set", "k"])["reached"]
    assert at0[("true", 0)] == 1.0 and at0[("top", 0)] == 0.5  # the argmax is in top:2
    from promptscope.viz.reachability import rank_figure

    assert rank_figure(run).layout.title.text  # a shared pair is drawn once, not a crash


def test_rank_follows_argmax_on_ties():
    from promptscope.analyses.reachability import _rank

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    ranks = _rank(logits, torch.tensor([[1, 2, 0], [3, 0, 1]]))
    assert ranks.tolist() == [[1, 2, 3], [4, 1, 2]]
    assert int(logits[0].argmax()) == 1 and int(logits[1].argmax()) == 0  # rank 1 = argmax


def test_one_pair_tuple_is_one_x0(tiny_llama):
    run = promptscope.reachability(tiny_llama, ("The cat sat on", 40), "true", k_max=1,
                                   method="greedy", bound=False, save=False, progress=False)
    assert run.df["x0"].tolist() == ["The cat sat on"] and run.df["target_id"].tolist() == [40]
    with pytest.raises(ReachabilityError, match="list of texts"):
        promptscope.reachability(tiny_llama, ("a", "b"), "top:2", save=False)


def test_saved_session_reloads_equal(tiny_llama):
    run = promptscope.reachability(tiny_llama, STATES[:1], "top:2", k_max=1, **FAST)
    loaded = promptscope.load(run.session_id)
    assert loaded.kind == "reachability" and loaded == run
    assert {"trace", "bound"} <= set(loaded.tables)


def test_reach_magic(ip, tiny_llama):
    from IPython.core.error import UsageError

    promptscope.load_model(str(tiny_llama.source), alias="tiny-llama")
    ip.run_cell_magic("reach", "--k 1 --targets top:2 --steps 2 --width 8 -o rr --no-bound",
                      "Is Paris in Europe?\nThe cat sat on\n")
    run = ip.user_ns["rr"]
    assert run.kind == "reachability" and len(run.df) == 4 and run.params["k_max"] == 1
    with pytest.raises(UsageError, match="at least 1 token"):
        ip.run_cell_magic("reach", "--k 0", "The cat\n")
    with pytest.raises(UsageError, match="one x0 per line"):
        ip.run_cell_magic("reach", "--k 1", "\n")


def test_reach_widget_runs_and_shows_the_moved_distribution(tiny_llama, monkeypatch):
    from promptscope.widgets import ReachWidget

    widget = ReachWidget(tiny_llama, "The cat sat on", k_max=1, steps=2)
    assert len(widget.targets.options) == 50 and len(widget.targets.value) == 3
    widget.start(wait=True)
    assert widget.result is not None and len(widget.result.df) == 3
    assert widget.progress.value == 3 and "control prompt" in widget.table.value
    widget.pick.value = widget.pick.options[0][1]
    fig = widget.dist.figure
    assert fig is not None and len(fig.data) == 2 and "→" in fig.layout.title.text
    assert len(set(fig.data[0].x)) == len(fig.data[0].x)  # byte tokens: one bar each
    widget.stop()  # after the run: harmless
    # stopped at once: the table, the progress and the picker show every pair the run kept
    always = type("Stopped", (), {"is_set": lambda self: True, "clear": lambda self: None})
    monkeypatch.setattr(widget, "_stop", always())
    widget.start(wait=True)
    assert "Stopped" in widget.status.value and widget.table.value.count("<tr>") == 4
    assert widget.pick.value is not None and widget.dist.figure is not None
    # a new run that fails before its first pair shows nothing of the last one
    from promptscope.analyses import reachability as module

    def failing(*args, **kwargs):
        raise RuntimeError("no pair done")

    monkeypatch.setattr(module, "reachability", failing)
    widget.start(wait=True)
    assert "Error" in widget.status.value and "<td>" not in widget.table.value
    assert widget.dist.figure is None


@pytest.mark.parametrize("arch", ["llama", "gemma3", "inkling"])
def test_one_hot_controls_are_embedded_as_the_model_embeds_tokens(tiny_family, arch):
    """GCG's gradient flows through one-hot control tokens; their embeddings must be what the
    model's own embedding module gives those tokens (Gemma scales rows by sqrt(d), Inkling
    normalises them), and every position, the padding token's too, must get a gradient."""
    from promptscope.analyses.reachability import embed_rows

    embed = tiny_family(arch).model.get_input_embeddings()
    ids = torch.tensor([[embed.padding_idx or 0, 5, 17], [3, 3, 40]])
    onehot = torch.nn.functional.one_hot(ids, embed.weight.shape[0]).to(embed.weight.dtype)
    onehot.requires_grad_(True)
    got = embed_rows(embed, onehot @ embed.weight)
    assert torch.allclose(got, embed(ids), atol=1e-6)
    probe = torch.randn(got.shape, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((got * probe).sum(), [onehot])
    assert (grad.abs().sum(-1) > 0).all()


def test_one_hot_forward_computes_the_models_logits(tiny_model):
    """GCG's gradient comes from a forward pass fed one-hot control tokens: it must compute
    what the model computes on the ids (given embeddings alone, Gemma 3n drops its per-layer
    embeddings), and give every control position a gradient."""
    from promptscope.analyses.reachability import one_hot_logits

    lm = tiny_model.model
    ids = torch.tensor([tiny_model.encode_prompt("Is Paris in Europe? Answer:")],
                       device=tiny_model.device)
    onehot, logits = one_hot_logits(lm, ids, 1, 3)
    with torch.no_grad():
        want = lm(input_ids=ids).logits[:, -1].float()
    assert torch.allclose(logits, want, atol=1e-4)
    (grad,) = torch.autograd.grad(torch.log_softmax(logits, -1)[0, 7], [onehot])
    assert (grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("arch", ["gemma3n", "gemma4"])
def test_one_hot_gradient_sees_the_per_layer_embeddings(tiny_family, arch):
    """A one-hot column's gradient says what putting that token at the position would do, and
    in Gemma 3n and 4 a token brings its per-layer embedding too. Changing the per-layer rows of
    tokens the prompt does not use leaves the forward as it was and must change their
    gradient (Gemma 4 would recover its per-layer rows from the embeddings without one)."""
    from promptscope.analyses.reachability import one_hot_logits
    from promptscope.models.hf import per_layer_embedding

    model = tiny_family(arch)
    lm = copy.deepcopy(model.model)
    ids = torch.tensor([model.encode_prompt("Is Paris in Europe? Answer:")])

    def run():
        onehot, logits = one_hot_logits(lm, ids, 1, 3)
        (grad,) = torch.autograd.grad(torch.log_softmax(logits, -1)[0, 7], [onehot])
        return logits.detach(), grad

    logits, grad = run()
    table = per_layer_embedding(lm).weight
    unused = torch.ones(table.shape[0], dtype=torch.bool)
    unused[ids[0]] = False
    with torch.no_grad():
        table[unused] += torch.randn(table[unused].shape,
                                     generator=torch.Generator().manual_seed(0))
    logits2, grad2 = run()
    assert torch.allclose(logits, logits2)
    assert not torch.allclose(grad[..., :table.shape[0]][..., unused],
                              grad2[..., :table.shape[0]][..., unused])


@pytest.mark.parametrize("arch", ["llama", "gemma3n"])
def test_bound_and_search_on_an_offloaded_model_equal_the_plain_ones(tiny_family, arch,
                                                                      tmp_path):
    """A model too big for its GPU is offloaded by accelerate (``device_map=...``): between
    forwards an offloaded module's weights are empty ``meta`` tensors. The bound and GCG read
    weights directly, and failed ("Tensor.item() cannot be called on meta tensors"); GCG's
    one-hot through Gemma's scaled embedding met the hook loading the real table over its own.
    Here the embeddings, the first layer and the head live on disk."""
    plain = tiny_family(arch)
    lm, prefix = plain.model, plain.model.base_model_prefix
    inner = getattr(lm, prefix)
    parts = [f"{prefix}.{n}" for n, _ in inner.named_children() if n != "layers"]
    parts += [f"{prefix}.layers.{i}" for i in range(len(inner.layers))]
    parts += [n for n, _ in lm.named_children() if n != prefix]
    on_disk = ("embed_tokens", "embed_tokens_per_layer", "layers.0", "lm_head")
    placed = HFModel.from_pretrained(
        plain.source, name=f"{arch}-offloaded", offload_folder=str(tmp_path),
        device_map={p: "disk" if p.endswith(on_disk) else "cpu" for p in parts})
    assert placed.model.get_input_embeddings().weight.device.type == "meta"
    x0s = ["The cat sat on", "Is Paris in Europe?"]
    if arch == "llama":
        got, want = (attention_bound(m, x0s, k=[1, 3]) for m in (placed, plain))
        assert len(got) > 0
        numbers = want.select_dtypes("number").columns
        assert got[numbers].to_numpy() == pytest.approx(want[numbers].to_numpy())
    kwargs = dict(targets="random:2", k_max=2, method="gcg", steps=3, exhaustive_k1=False,
                  bound=False, save=False, progress=False)
    got, want = (promptscope.reachability(m, x0s, **kwargs).df for m in (placed, plain))
    assert got["control_ids"].tolist() == want["control_ids"].tolist()
    assert got["prob"].tolist() == pytest.approx(want["prob"].tolist(), rel=1e-4)


class _Int8Linear(torch.nn.Module):
    """A quantized projection stored as quantization libraries store one: int8 values and a
    scale per row in place of the float weight, packed into one column (as bitsandbytes packs
    its 4-bit weights: the ``weight`` no longer has the matrix's shape), dequantized in the
    forward."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8).reshape(-1, 1))
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.Tensor:
        return self.weight.reshape(self.out_features, -1) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantized().to(x.dtype).T


def test_bound_reads_a_quantized_models_matrices(tiny_llama):
    """A quantized projection's ``weight`` is not its matrix (bitsandbytes' 4-bit packs two
    values a byte into a column: the bound crashed with "size mismatch", then read the head
    counts off the packed shape; int8 values gave singular values 1/scale too large,
    silently). The bound must equal the one of the same model with the dequantized matrices as
    plain float weights."""
    quantized = copy.deepcopy(tiny_llama.model)
    dequantized = copy.deepcopy(tiny_llama.model)
    for q_layer, d_layer in zip(quantized.model.layers, dequantized.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            packed = _Int8Linear(getattr(q_layer.self_attn, name))
            setattr(q_layer.self_attn, name, packed)
            with torch.no_grad():
                getattr(d_layer.self_attn, name).weight.copy_(packed.dequantized())
    got, want = (attention_bound(HFModel(lm, tiny_llama.tokenizer, name=name), "The cat sat on",
                                 k=[1, 4])
                 for lm, name in ((quantized, "int8"), (dequantized, "dequantized")))
    numbers = want.select_dtypes("number").columns
    assert got[numbers].to_numpy() == pytest.approx(want[numbers].to_numpy(), rel=1e-5)


def test_bound_refuses_latent_attention_and_the_search_runs_without_it(tiny_family):
    """Multi-head latent attention (DeepSeek V3, Kimi K2) has no key and value projections of
    its own: the bound does not apply, says so, and the search still runs (it crashed)."""
    model = tiny_family("deepseek_v3")
    with pytest.raises(BoundUnsupported, match="another layout"):
        attention_bound(model, "The cat sat on", k=1)
    result = promptscope.reachability(model, "The cat sat on", targets="top:2", k_max=1,
                                      save=False, progress=False)
    assert len(result.df) == 2 and "another layout" in result.params["bound_skipped"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_layer0_bound_holds_for_every_one_token_control(tiny_family, arch):
    """At layer 0 the bound is exact in the paper's setting: the attention the last query pays
    to one control token (after the BOS, as the search places it) never exceeds beta, for every
    token of the vocabulary. Qwen3 normalises queries and keys per head, so the projections'
    singular values say nothing about the scores: with its query projection shrunk a
    thousandfold they would promise a beta the real attention exceeds."""
    model = tiny_family(arch)
    lm = copy.deepcopy(model.model)
    if arch == "qwen3":
        with torch.no_grad():
            lm.model.layers[0].self_attn.q_proj.weight.mul_(1e-3)
    shrunk = HFModel(lm, model.tokenizer, name=f"{arch}-check")
    x0 = STATES[0]
    bound = attention_bound(shrunk, x0, k=1)
    beta = torch.tensor(bound[bound.layer == 0].sort_values("head")["beta"].to_numpy())
    ids = shrunk.encode_prompt(x0)
    controls = [t for t in range(len(model.tokenizer))
                if t not in set(model.tokenizer.all_special_ids)]
    batch = torch.tensor([[ids[0], t, *ids[1:]] for t in controls])
    lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = lm(input_ids=batch, output_attentions=True).attentions[0]  # [N, H, L, L]
    finally:
        lm.set_attn_implementation("sdpa")
    to_control = att[:, :, -1, 1]  # [N, H]
    assert (to_control.max(0).values <= beta + 1e-6).all()
    assert beta.max() < 0.999  # the check says something: beta is not trivially 1


def test_bound_refuses_layer_norm_and_a_failing_bound_never_stops_the_search(tiny_llama,
                                                                             monkeypatch):
    """A LayerNorm before attention subtracts the mean (the bound's gains assume an RMS norm):
    refused, not a wrong number; and any other failure of the bound is a warning, not a stop."""
    lm = copy.deepcopy(tiny_llama.model)
    for layer in lm.model.layers:
        layer.input_layernorm = torch.nn.LayerNorm(lm.config.hidden_size)
    with pytest.raises(BoundUnsupported, match="RMS norm.*LayerNorm"):
        attention_bound(HFModel(lm, tiny_llama.tokenizer, name="ln"), "The cat sat on", k=1)
    from promptscope.analyses import reach_bound

    def broken(*args, **kwargs):
        raise RuntimeError("shapes do not match")

    monkeypatch.setattr(reach_bound, "attention_bound", broken)
    with pytest.warns(UserWarning, match="the bound failed \\(RuntimeError"):
        run = promptscope.reachability(tiny_llama, "The cat sat on", "top:2", k_max=1,
                                       method="greedy", save=False, progress=False)
    assert len(run.df) == 2 and "shapes do not match" in run.params["bound_skipped"]


def test_layer0_log_g_is_x0s_share_as_it_stands_after_k_control_tokens(tiny_llama):
    """With a BOS the search builds "BOS u x0": k control tokens move x0 k positions away from
    the BOS, which rotary scores see. g_i(X0) at layer 0 is the real sequence's score mass on
    BOS and x0 (computed here on the whole sequence, control tokens in place)."""
    lm = tiny_llama.model
    x0 = STATES[0]
    ids = tiny_llama.encode_prompt(x0)
    layer = lm.model.layers[0]
    a = layer.self_attn
    module = sys.modules[type(a).__module__]
    bound = attention_bound(tiny_llama, x0, k=[1, 3])
    for k in (1, 3):
        seq = torch.tensor([[ids[0], *[5 + i for i in range(k)], *ids[1:]]])
        n = seq.shape[1]
        with torch.no_grad():
            x = layer.input_layernorm(lm.model.embed_tokens(seq))
            hd = a.head_dim
            q = a.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
            kk = a.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
            cos, sin = lm.model.rotary_emb(x, torch.arange(n)[None])
            q, kk = module.apply_rotary_pos_emb(q, kk, cos, sin)
        keep = [0, *range(k + 1, n)]  # BOS and x0, not the control tokens
        group = q.shape[1] // kk.shape[1]
        want = [float(torch.logsumexp((kk[0, h // group, keep] @ q[0, h, -1]) * a.scaling, 0))
                for h in range(q.shape[1])]
        got = bound[(bound.k == k) & (bound.layer == 0)].sort_values("head")["log_g"]
        assert got.tolist() == pytest.approx(want, abs=1e-4)


def test_a_ctrl_c_anywhere_keeps_every_pair_listed(tiny_llama):
    """Wherever a Ctrl-C lands in the search's bookkeeping, the partial result lists every
    pair once per target set (unfinished ones as not complete), as the finished run does."""
    from ctrl_c import CtrlCAt

    def run():
        return promptscope.reachability(tiny_llama, STATES, "top:2", k_max=1, method="greedy",
                                        progress=False, bound=False, save=False)

    every = sorted(run().df["pair"].tolist())
    k = 1
    while True:
        with CtrlCAt(k, ("analyses/reachability.py",)) as ctrl_c:
            try:
                run()
            except KeyboardInterrupt as exc:
                partial = getattr(exc, "partial_result", None)
        if not ctrl_c.fired:
            break
        if partial is not None and len(partial.df):
            assert sorted(partial.df["pair"].tolist()) == every, ctrl_c.where
        k += 1
    assert k > 30


def test_ranks_of_many_targets_equal_one_target_at_a_time():
    """Thousands of targets of one x0 were ranked one column at a time, each a [rows, vocab]
    temporary: a kernel went past 24 GB. Many targets now use one stable sort per row, with
    the same ranks (ties to the lower id, as argmax)."""
    import torch

    from promptscope.analyses.reachability import _rank

    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 3, (40, 300), generator=gen).float()  # many ties
    targets = torch.randint(0, 300, (40, 30), generator=gen)
    many = _rank(logits, targets)
    one_by_one = torch.cat([_rank(logits, targets[:, j:j + 1]) for j in range(30)], 1)
    assert torch.equal(many, one_by_one)
    assert torch.equal(many == 1, targets == logits.argmax(-1, keepdim=True))
