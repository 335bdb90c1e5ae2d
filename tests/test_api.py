"""The OpenAI-compatible backend against a real vLLM server (CPU), white-box vs black-box.

The server (a tiny llama with head_dim 64) starts once per test session on 127.0.0.1. Faults a
real server does not produce on demand come from ``fault_proxy.FaultProxy`` in front of it; the
``openai`` client is never mocked. Without ``PROMPTSCOPE_VLLM_PYTHON`` the server tests skip
locally (``.ci/run`` installs vLLM and sets it; in CI they must run).
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from IPython.core.error import UsageError
from vllm_server import ENV_PYTHON, server_model_dir, vllm_python, vllm_server

import promptscope
from promptscope.errors import CapabilityError, ModelLoadError, PromptscopeError
from promptscope.models import openai_api
from promptscope.models.openai_api import APIRequestError, OpenAIModel

TEMPLATE = "Is {city} in {{Europe|Asia}}? Answer:"
CITIES = [{"city": c} for c in ("Paris", "Tokyo", "Oslo")]
SECRET = "sk-test-0123456789abcdefSECRETkey"
NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "07_api_models.ipynb"


# ---------------------------------------------------------------------- no server needed
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_response_cache_opened_by_many_threads_at_once(tmp_path):
    """Request threads (and kernels) may open the same new cache file together: each one works
    (CI once saw "database is locked" from two connections switching the file to WAL)."""
    import threading

    from promptscope.models.cache import ResponseCache

    for round_ in range(20):  # the race is rare: without the fix about 1 round in 40 failed
        path = tmp_path / f"cache{round_}.sqlite"
        errors: list[BaseException] = []
        start = threading.Barrier(16)

        def open_and_write(i: int, path: Path = path, errors: list = errors,
                           start: threading.Barrier = start) -> None:
            try:
                start.wait()
                cache = ResponseCache(path)
                for j in range(30):  # writes while other threads still open the file
                    cache.put(f"k{i}-{j}", {"i": i})
            except BaseException as exc:  # noqa: BLE001 - the test collects every failure
                errors.append(exc)

        threads = [threading.Thread(target=open_and_write, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(ResponseCache(path)) == 16 * 30


def test_bad_url_missing_key_and_unreachable_server_are_clear(monkeypatch):
    with pytest.raises(ModelLoadError, match="not an http"):
        promptscope.load_model("openai:m", base_url="localhost:8000")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ModelLoadError, match="OPENAI_API_KEY"):
        promptscope.load_model("openai:gpt-4o-mini")
    with pytest.raises(ModelLoadError, match="MY_KEY"):
        OpenAIModel("m", base_url="http://127.0.0.1:9/v1", api_key_env="MY_KEY")
    port = _closed_port()
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="Cannot reach") as err:
        promptscope.load_model("openai:m", base_url=f"http://user:{SECRET}@127.0.0.1:{port}/v1",
                               api_key=SECRET)
    assert time.perf_counter() - t0 < 10
    assert SECRET not in str(err.value)
    with pytest.raises(ModelLoadError, match="for API models"):
        promptscope.load_model("some-folder", base_url="http://127.0.0.1:1/v1")


def test_api_model_states_what_it_cannot_do():
    model = OpenAIModel("m", base_url=f"http://127.0.0.1:{_closed_port()}/v1", check=False)
    assert model.capabilities == {"score", "generate", "token_logprobs"}
    for capability, word in [("attention", "attention"), ("hidden_states", "steering"),
                             ("gradients", "gradients")]:
        with pytest.raises(CapabilityError, match=word) as err:
            model.require(capability, "This analysis")
        assert "OpenAIModel" in str(err.value)
    assert "api_key" not in str(model.describe()) and model.per_request_errors


def test_a_ctrl_c_keeps_the_api_rows_already_answered(monkeypatch):
    """Answered requests were billed: a Ctrl-C part way through a chunk keeps their rows (in
    the exception and the session); the others say they have no answer."""
    from promptscope.analyses import prompt as prompt_module
    from promptscope.models.base import Generation

    model = OpenAIModel("m", base_url=f"http://127.0.0.1:{_closed_port()}/v1", check=False,
                        max_concurrency=1, cache=False)
    monkeypatch.setattr(model, "_generate_one", lambda prompt, **kw: [
        Generation(text=f" {prompt[-2]}", tokens=["t"], logprob=-1.0, prompt_tokens=3)])

    class Bar:  # the run's progress bar: the Ctrl-C lands as the third answer is counted
        n = 0

        def update(self, k=1):
            self.n += k
            if self.n == 3:
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(prompt_module, "_progress_bar", lambda *a: Bar())
    rows = [{"x": str(i)} for i in range(6)]
    with pytest.raises(KeyboardInterrupt) as stop:
        promptscope.run_prompt("Say {x}:", model, vars=rows, max_new_tokens=2, progress=False)
    df = stop.value.partial_result.df
    answered = df[df["error"].isna()]
    assert len(answered) >= 3 and answered["output"].tolist()[:3] == [" 0", " 1", " 2"]
    assert df.loc[df["error"].notna(), "error"].str.startswith("no answer: interrupted").all()
    saved = promptscope.load(stop.value.partial_result.session_id)
    assert saved.status == "interrupted" and len(saved.df) == len(df) == 6


def test_top_logprobs_match_choices_by_their_bytes():
    """OpenAI's chat answer names a token that holds part of a character by its bytes (the
    documented ``bytes`` field; its ``token`` is ``"bytes:\\xf0\\x9f"``): such a token is
    the start of a choice like an emoji, and a whole-character token still matches as text."""
    from promptscope.models.openai_api import _first_top_logprobs, _match_top

    thumb = "👍".encode()
    data = {"choices": [{"logprobs": {"content": [{"token": "x", "logprob": -3.0,
                                                   "top_logprobs": [
        {"token": "bytes:\\xf0\\x9f", "bytes": list(thumb[:2]), "logprob": -0.5},
        {"token": "是", "bytes": list("是".encode()), "logprob": -1.0},
        {"token": " no", "bytes": list(b" no"), "logprob": -2.0}]}]}}]}
    top = _first_top_logprobs(data, chat=True)
    assert _match_top(" 👍", top).logprob == pytest.approx(-0.5)
    assert _match_top("是", top).logprob == pytest.approx(-1.0)
    assert _match_top(" no", top).logprob == pytest.approx(-2.0)
    assert _match_top(" yes", top).logprob == -math.inf
    plain = {"choices": [{"logprobs": {"top_logprobs": [{" 是": -0.25, "\u00a0no": -1.5}]}}]}
    assert _match_top("是", _first_top_logprobs(plain, chat=False)).logprob == -0.25
    assert _match_top(" no", _first_top_logprobs(plain, chat=False)).logprob == -1.5  # nbsp
    assert _first_top_logprobs({"choices": [{"logprobs": {"top_logprobs": [None]}}]},
                               chat=False) is None


def test_choices_without_an_index_keep_their_order():
    from promptscope.models.openai_api import _in_order

    assert [c["text"] for c in _in_order([{"index": 1, "text": "b"}, {"index": 0, "text": "a"}])
            ] == ["a", "b"]
    assert [c["text"] for c in _in_order([{"index": None, "text": "x"}, {"text": "y"}])
            ] == ["x", "y"]


# ---------------------------------------------------------------------- the real server
@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """(base_url, model folder, served name) of one vLLM server for the whole session.

    ``PROMPTSCOPE_TEST_VLLM_URL`` + ``PROMPTSCOPE_TEST_VLLM_MODEL_DIR`` reuse a running server
    (serving the folder as ``tiny``) while developing.
    """
    if os.environ.get("PROMPTSCOPE_TEST_VLLM_URL"):
        yield (os.environ["PROMPTSCOPE_TEST_VLLM_URL"],
               Path(os.environ["PROMPTSCOPE_TEST_VLLM_MODEL_DIR"]), "tiny")
        return
    if not vllm_python():
        if os.environ.get("CI"):
            pytest.fail(f"{ENV_PYTHON} is not set in CI: .ci/run must install vLLM.")
        pytest.skip(f"no vLLM environment: set {ENV_PYTHON} to its python (see .ci/run)")
    root = tmp_path_factory.mktemp("vllm")
    folder, served = server_model_dir(root)
    t0 = time.perf_counter()
    with vllm_server(folder, served_name=served, log_path=root / "vllm.log") as url:
        print(f"\nvLLM server ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        yield url, folder, served


@pytest.fixture(scope="session")
def hf(server):
    from promptscope.models.hf import HFModel

    return HFModel.from_pretrained(server[1], name="white-box", device="cpu", dtype="fp32")


@pytest.fixture
def api(server):
    return OpenAIModel(server[2], base_url=server[0], name="black-box")


@pytest.fixture
def proxy(server):
    with FaultProxy(server[0].removesuffix("/v1")) as p:
        yield p


def _proxied(proxy, server, **kwargs):
    kwargs.setdefault("backoff", 0.05)
    kwargs.setdefault("cache", False)
    kwargs.setdefault("prompts_per_request", 1)  # the fault tests count one request per prompt
    model = OpenAIModel(server[2], base_url=proxy.url, name="proxied", **kwargs)
    model.begin_run("choices", chat=False)  # its probe of the server, before any fault
    return model


def test_choices_and_target_agree_with_the_white_box_model(hf, api):
    white = promptscope.run_prompt(TEMPLATE, hf, vars=CITIES, choices=" yes| no| maybe so",
                                   progress=False)
    black = promptscope.run_prompt(TEMPLATE, api, vars=CITIES, choices=" yes| no| maybe so",
                                   progress=False)
    assert black.params["api"]["scoring"] == "echo"
    assert black.df["prompt"].tolist() == white.df["prompt"].tolist()
    assert black.df["logprob"].tolist() == pytest.approx(white.df["logprob"].tolist(), abs=1e-3)
    assert black.df["prob"].tolist() == pytest.approx(white.df["prob"].tolist(), abs=1e-3)
    assert black.df["n_tokens"].tolist() == white.df["n_tokens"].tolist()
    assert black.df["error"].isna().all() and "error" not in white.df.columns
    chosen = [run.df[run.df["chosen"]]["choice"].tolist() for run in (black, white)]
    assert chosen[0] == chosen[1] and len(black.summary()) == 6

    white_t = promptscope.run_prompt("{{Hi|Hello}} there", hf, target=" friend of mine",
                                     progress=False)
    black_t = promptscope.run_prompt("{{Hi|Hello}} there", api, target=" friend of mine",
                                     progress=False)
    assert black_t.df["logprob"].tolist() == pytest.approx(white_t.df["logprob"].tolist(),
                                                           abs=1e-3)
    assert black_t.df["n_tokens"].tolist() == white_t.df["n_tokens"].tolist()
    assert min(black_t.df["n_tokens"]) > 1
    back = promptscope.load(black_t.session_id)
    assert back == black_t and back.params["api"]["requests"] == 1  # both prompts in one


def test_format_spread_and_posix_agree_with_the_white_box_model(hf, api):
    """The black-box analyses give the white-box numbers through the API (exact echo log-probs)."""
    data = [{"text": "red apple", "label": "yes"}, {"text": "blue sky", "label": "no"},
            {"text": "green tree", "label": "no"}, {"text": "red car", "label": "yes"}]
    spreads = [promptscope.format_spread(data, m, label="label", choices=["yes", "no"],
                                         formats=4, shots=1, seed=3, progress=False)
               for m in (hf, api)]
    white, black = (s.tables["formats"].set_index("format")["accuracy"] for s in spreads)
    assert black.to_dict() == white.to_dict()
    gold = [s.df["logprob_gold"].tolist() for s in spreads]
    assert gold[1] == pytest.approx(gold[0], abs=1e-3)

    rows = [{"city": "Paris"}, {"city": "Tokyo"}]
    kwargs = dict(template="Where is {city}? It is in", templates=["{city} is in"],
                  n_variants=3, responses=[" France", " Japan"], progress=False)
    posix = [promptscope.posix(rows, m, **kwargs) for m in (hf, api)]
    for kind, value in posix[0].params["posix"].items():
        assert posix[1].params["posix"][kind] == pytest.approx(value, abs=1e-3)
    assert posix[1].df["logprob"].tolist() == pytest.approx(posix[0].df["logprob"].tolist(),
                                                            abs=1e-3)


def test_part_attribution_by_ablation_agrees_with_the_white_box_model(hf, api):
    """captum's perturbation methods over template parts run through the endpoint: the same
    attributions as the local path (ablation, and Shapley sampling with the same seed)."""
    template = "Note: {x} <<Paris is in France.>> Q: Where is Paris? A:"
    for method in ("ablation", "shapley"):
        runs = [promptscope.attribute(template, m, vars=[{"x": "Tea is hot."}], target=" France",
                                      method=method, n_samples=3, progress=False)
                for m in (hf, api)]
        white, black = (r.df for r in runs)
        assert black["part"].tolist() == white["part"].tolist() == [
            "text1", "x", "text2", "emphasis", "text3"]
        assert black["attribution"].tolist() == pytest.approx(white["attribution"].tolist(),
                                                              abs=1e-3)
        assert black["logprob"].tolist() == pytest.approx(white["logprob"].tolist(), abs=1e-3)
        assert (black["error"] == "").all() and runs[1].params["api"]["scoring"] == "echo"
        assert runs[1].params["api"]["requests"] >= 2  # the whole prompt, then the ablations
    # choices: one row set per choice, the same pick as the local model
    picks = [promptscope.attribute("Is {city} in Europe? Answer:", m, vars=CITIES[:1],
                                   choices=" yes| no", progress=False).df for m in (hf, api)]
    assert picks[1]["chosen"].tolist() == picks[0]["chosen"].tolist()
    assert picks[1]["attribution"].tolist() == pytest.approx(picks[0]["attribution"].tolist(),
                                                             abs=1e-3)
    with pytest.raises(CapabilityError, match="gradients"):
        promptscope.attribute(template, api, vars=[{"x": "a"}], target=" France",
                              level="tokens", progress=False)
    with pytest.raises(PromptscopeError, match="local model"):
        promptscope.attribute("A {x} B {y}", api, vars=[{"x": "1", "y": "2"}], target_part="y",
                              progress=False)


def test_attribution_needs_log_probs_from_the_endpoint(server):
    answers_only = OpenAIModel(server[2], base_url=server[0], scoring="generated", cache=False)
    with pytest.raises(CapabilityError, match="needs log-probabilities"):
        promptscope.attribute("Is {city} in Europe? Answer:", answers_only, vars=CITIES[:1],
                              choices=" yes| no", progress=False)


def test_greedy_reachability_through_the_endpoint_equals_the_local_search(hf, api, server,
                                                                         tmp_path):
    """The greedy back-generation on token ids, scored by the server: the same control prompts,
    probabilities and ranks as the local search."""
    from promptscope.analyses.reachability import ReachabilityError

    tok = api.tokenizer
    assert len(tok) == len(hf.tokenizer)
    x0s = ["Is Paris in Europe? Answer", "Hello there"]
    kwargs = dict(targets=["top:3", "random:2"], k_max=2, method="greedy",
                  control_tokens=list(range(40, 160)), seed=1, progress=False)
    white, black = (promptscope.reachability(m, x0s, **kwargs) for m in (hf, api))
    cols = ["x0", "target_id", "base_rank", "reached", "k", "control_ids", "rank", "steps",
            "text_roundtrip"]
    assert black.df[cols].astype(str).values.tolist() == white.df[cols].astype(str).values.tolist()
    for col in ("base_prob", "prob"):
        assert black.df[col].tolist() == pytest.approx(white.df[col].tolist(), abs=1e-3)
    assert black.df["reached"].any() and not black.df["reached"].all()
    assert black.params["unverified_claims"] == 0 and "bound_skipped" in black.params
    assert black.params["api"]["requests"] > 0 and black.params["method"] == "greedy"
    with pytest.raises(CapabilityError, match="greedy"):
        promptscope.reachability(api, x0s, "top:2", method="gcg", progress=False)
    for bottom in ("bottom:3", ["top:2", "bottom:3"], [["bottom:3"], ["top:1"]]):
        with pytest.raises(ReachabilityError, match="bottom:3"):
            promptscope.reachability(api, x0s, bottom, progress=False)
    other = promptscope.models.organism_path()
    if server[2] == "organism":  # serving the organism: a tiny model's tokenizer is the wrong one
        from promptscope.testing import make_tiny_model

        other = make_tiny_model(tmp_path / "other", arch="llama")
    wrong = OpenAIModel(api.model_id, base_url=api.base_url, tokenizer=str(other))
    with pytest.raises(CapabilityError, match="does not tokenise like"):
        promptscope.reachability(wrong, x0s, "top:2", progress=False)


def test_a_failed_base_measurement_is_no_probability_of_zero(server, proxy):
    model = _proxied(proxy, server, max_retries=0)
    proxy.inject("ok", "500")  # the top tokens answer; the exact base log-prob fails
    run = promptscope.reachability(model, ["Hello there"], "top:1", k_max=1, method="greedy",
                                   control_tokens=list(range(40, 50)), progress=False,
                                   save=False)
    assert math.isnan(run.df["base_prob"].iloc[0]) and run.df["base_rank"].iloc[0] == 0


def test_greedy_generation_agrees_plain_and_chat(hf, api):
    template = "{{Hi|Hello|The cat|Question: what colour is the sky?}} {{there|now}}"
    for chat in (False, True):
        white = promptscope.run_prompt(template, hf, max_new_tokens=8, chat=chat, progress=False)
        black = promptscope.run_prompt(template, api, max_new_tokens=8, chat=chat,
                                       progress=False)
        readable = ~white.df["output"].str.contains("\ufffd")  # partial UTF-8: servers differ
        assert readable.sum() >= 6
        assert black.df["output"][readable].tolist() == white.df["output"][readable].tolist()
        assert black.df["finish_reason"].tolist() == white.df["finish_reason"].tolist()
        assert black.df["logprob"].tolist() == pytest.approx(white.df["logprob"].tolist(),
                                                             abs=1e-3)


def test_chat_choices_use_top_logprobs_and_match_the_white_box_distribution(hf, server):
    import torch

    top_k = 300  # within the vocabulary (vLLM's server fails on more)
    api = OpenAIModel(server[2], base_url=server[0], top_logprobs=top_k, scoring="top_logprobs")
    black = promptscope.run_prompt(TEMPLATE, api, vars=CITIES, choices="yes|no", chat=True,
                                   progress=False)
    assert black.params["api"]["scoring"] == "top_logprobs"
    tok = hf.tokenizer
    vocab = [tok.decode([i]) for i in range(len(tok))]
    for prompt, group in black.df.groupby("prompt", sort=False):
        ids = hf.encode_prompt(hf.chat_prompt(prompt))
        with torch.no_grad():
            logits = hf.model(torch.tensor([ids])).logits[0, -1]
        logp = torch.log_softmax(logits.float(), -1)
        top = set(torch.topk(logp, top_k).indices.tolist())
        for choice, got in zip(group["choice"], group["logprob"]):
            hits = [i for i in top if vocab[i].strip() == choice] or [
                i for i in top if vocab[i].strip() and choice.startswith(vocab[i].strip())]
            expected = torch.logsumexp(logp[hits], 0).item() if hits else -math.inf
            assert got == pytest.approx(expected, abs=1e-3)
    with pytest.raises(CapabilityError, match="--target with --chat"):
        promptscope.run_prompt("Hi", api, target=" yes", chat=True, progress=False)
    with pytest.raises(CapabilityError, match="POSIX scores every response.*exact"):
        promptscope.posix(["Hi", "Hey"], api, chat=True, progress=False, save=False)


def test_chat_target_and_choices_are_exact_through_the_servers_chat_template(hf, api):
    """vLLM renders the chat template (/tokenize + /detokenize), so chat prompts are scored
    with echo: the log-prob of a given reply equals the white-box model's, like plain ones."""
    reply = " Paris is in Europe."
    white = promptscope.run_prompt(TEMPLATE, hf, vars=CITIES, target=reply, chat=True,
                                   progress=False)
    black = promptscope.run_prompt(TEMPLATE, api, vars=CITIES, target=reply, chat=True,
                                   progress=False)
    assert black.params["api"]["scoring"] == "echo"
    assert black.df["logprob"].tolist() == pytest.approx(white.df["logprob"].tolist(), abs=1e-3)
    white = promptscope.run_prompt(TEMPLATE, hf, vars=CITIES, choices="yes|no", chat=True,
                                   progress=False)
    black = promptscope.run_prompt(TEMPLATE, api, vars=CITIES, choices="yes|no", chat=True,
                                   progress=False)
    assert black.params["api"]["scoring"] == "echo"
    assert black.df["logprob"].tolist() == pytest.approx(white.df["logprob"].tolist(), abs=1e-3)


def test_the_magic_runs_an_api_model(server, hf, capsys):
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.run_line_magic("load_ext", "promptscope")
    os.environ["PROMPTSCOPE_TEST_KEY"] = SECRET
    try:
        ip.run_line_magic("promptscope", f"model openai:{server[2]} --base-url {server[0]} "
                          "--api-key-env PROMPTSCOPE_TEST_KEY --max-concurrency 4 --as magic-api")
    finally:
        del os.environ["PROMPTSCOPE_TEST_KEY"]
    out = capsys.readouterr()
    assert "magic-api" in out.out and SECRET not in out.out + out.err
    ip.user_ns["cities"] = CITIES
    run = ip.run_cell_magic("prompt", '--vars cities --choices " yes| no" -o run', TEMPLATE)
    white = promptscope.run_prompt(TEMPLATE, hf, vars=CITIES, choices=" yes| no",
                                   progress=False)
    assert run.model["name"] == "magic-api" and run.params["api"]["scoring"] == "echo"
    assert run.df["logprob"].tolist() == pytest.approx(white.df["logprob"].tolist(), abs=1e-3)
    with pytest.raises(CapabilityError, match="attention"):
        promptscope.models.default_model().require("attention", "Attention capture")
    if importlib.util.find_spec("promptscope.models.steering"):  # steering landed: it says so
        with pytest.raises(UsageError, match="Attention steering needs attention weights"):
            ip.run_cell_magic("prompt", '--steer --choices " yes| no"', "Is <<Paris>> big?")


def test_concurrency_is_bounded_and_progress_is_reported(server, proxy):
    model = _proxied(proxy, server, max_concurrency=3)
    # A remote server's round trip: without it a fast local server can answer each request
    # before the next is sent (seen once, on a loaded CI machine: at most 1 in flight).
    proxy.latency = 0.05
    prompts = [f"Question {i}: is it" for i in range(24)]
    seen: list[int] = []
    scores = model.score(prompts, [" yes"] * 24, progress=seen.append)
    assert sum(seen) == 24 and all(s.error is None for s in scores)
    assert proxy.counts["/v1/completions"] >= 24
    assert 2 <= proxy.max_in_flight <= 3


def test_several_prompts_per_request_give_the_same_scores(server, proxy):
    one = _proxied(proxy, server)
    packed = _proxied(proxy, server, prompts_per_request=4, max_concurrency=2)
    prompts = [f"Question {i}: is it" for i in range(10)]
    conts = [" yes", " no"] * 5
    before = proxy.counts["/v1/completions"]
    seen: list[int] = []
    scores = packed.score(prompts, conts, progress=seen.append)
    assert proxy.counts["/v1/completions"] - before == 3 and sorted(seen) == [2, 4, 4]
    single = one.score(prompts, conts)
    assert [s.logprob for s in scores] == pytest.approx([s.logprob for s in single], abs=1e-5)
    assert [s.tokens for s in scores] == [s.tokens for s in single]
    flaky = _proxied(proxy, server, prompts_per_request=4, max_concurrency=1, max_retries=2)
    proxy.inject("500", "500", "500")  # a pack that fails for good fails its prompts only
    got = flaky.score(prompts, conts)
    assert [s.error is not None for s in got] == [True] * 4 + [False] * 6


def test_a_pack_sends_only_prompts_not_answered_before(server, proxy, tmp_path):
    """The cache is keyed per prompt: adding a variant (or a choice) to a packed run sends and
    bills the new prompt alone, and the scores are those of a fresh run."""
    model = _proxied(proxy, server, cache=True, cache_path=tmp_path / "cache.sqlite",
                     prompts_per_request=16)
    prompts = [f"Question {i}: is it" for i in range(4)]
    model.score(prompts[:3], [" yes"] * 3)
    before = proxy.counts["/v1/completions"]
    model.begin_run("choices", chat=False)
    got = model.score(prompts + prompts[:1], [" yes"] * 4 + [" no"])
    info = model.run_info()
    assert proxy.counts["/v1/completions"] == before + 1 and info["cached"] == 0
    fresh = _proxied(proxy, server, prompts_per_request=16)
    fresh.begin_run("choices", chat=False)
    want = fresh.score([prompts[3], prompts[0]], [" yes", " no"])
    assert info["prompt_tokens"] == fresh.run_info()["prompt_tokens"]  # the 2 new texts only
    alone = fresh.score(prompts + prompts[:1], [" yes"] * 4 + [" no"])
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in alone], abs=1e-5)
    assert [got[3].logprob, got[4].logprob] == pytest.approx([s.logprob for s in want], abs=1e-5)
    model.begin_run("choices", chat=False)
    sent = proxy.counts["/v1/completions"]
    again = model.score(prompts + prompts[:1], [" yes"] * 4 + [" no"])
    assert proxy.counts["/v1/completions"] == sent  # all five from the cache now
    assert model.run_info()["cached"] == model.run_info()["requests"] == 1
    assert [s.logprob for s in again] == [s.logprob for s in got]


def test_a_prompt_the_server_rejects_fails_alone_in_its_pack(server, proxy):
    """vLLM rejects a prompt longer than its context (HTTP 400), and with it the whole
    request: the pack is sent again one prompt per request, so the others are scored."""
    packed = _proxied(proxy, server, prompts_per_request=4)
    prompts = [f"Question {i}: is it" for i in range(4)]
    prompts[2] = "word " * 400  # past the server's 256-token context
    got = packed.score(prompts, [" yes"] * 4)
    assert [s.error is not None for s in got] == [False, False, True, False]
    assert "400" in got[2].error
    single = _proxied(proxy, server).score([prompts[i] for i in (0, 1, 3)], [" yes"] * 3)
    assert [got[i].logprob for i in (0, 1, 3)] == pytest.approx([s.logprob for s in single],
                                                                abs=1e-5)
    bad = packed.token_logprobs([[5] * 300, [5, 6, 7]], [8, 8], batch=2)
    assert bad[0] == (-math.inf, 0) and math.isfinite(bad[1][0])
    packed.begin_run("choices", chat=False)
    packed.score(prompts, [" yes"] * 4)
    assert packed.run_info()["failed"] == 1  # the bad prompt's request, not the pack's too
    # A stopped run sends no more of a rejected pack's prompts one by one.
    sent = proxy.counts["/v1/completions"]
    stop, got = threading.Event(), []
    stop.set()

    def worker() -> None:
        openai_api._local.stop = stop
        body = {"model": packed.model_id, "echo": True, "logprobs": 1,
                "max_tokens": packed._echo_max_tokens,
                "temperature": 0.0}
        got.extend(packed._request_each(body, [p + " no" for p in prompts]))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=60)
    assert proxy.counts["/v1/completions"] == sent + 1  # the pack only
    assert all("cancelled" in str(g) for g in got)


def test_cache_makes_a_rerun_free_and_can_be_turned_off(server, proxy, capsys):
    model = _proxied(proxy, server, cache=True)
    first = promptscope.run_prompt(TEMPLATE, model, vars=CITIES, choices=" yes| no")
    sent = proxy.counts["/v1/completions"]
    assert first.params["api"]["cached"] == 0 and first.params["api"]["requests"] == 6
    again = promptscope.run_prompt(TEMPLATE, model, vars=CITIES, choices=" yes| no")
    assert proxy.counts["/v1/completions"] == sent  # not one request
    assert again.params["api"]["cached"] == again.params["api"]["requests"] == 6
    assert again.df["logprob"].tolist() == first.df["logprob"].tolist()
    assert "all from the cache" in capsys.readouterr().err
    greedy = promptscope.run_prompt("Hi {{a|b}}", model, max_new_tokens=3, progress=False)
    promptscope.run_prompt("Hi {{a|b}}", model, max_new_tokens=3, progress=False)
    assert greedy.params["api"]["cached"] == 0
    sampled = [promptscope.run_prompt("Hi {{a|b}}", model, max_new_tokens=3, temperature=0.8,
                                      progress=False) for _ in range(2)]
    assert sampled[1].params["api"]["cached"] == 0  # sampling is never cached
    off = _proxied(proxy, server, cache=False)
    before = proxy.counts["/v1/completions"]
    promptscope.run_prompt(TEMPLATE, off, vars=CITIES, choices=" yes| no", progress=False)
    assert proxy.counts["/v1/completions"] == before + 6


@pytest.mark.parametrize("fault", ["429", "500", "slow:3", "badjson", "drop"])
def test_transient_faults_are_retried(server, proxy, hf, fault):
    model = _proxied(proxy, server, timeout=1.5)
    proxy.inject(fault, fault)
    t0 = time.perf_counter()
    run = promptscope.run_prompt(TEMPLATE, model, vars=CITIES[:1], choices=" yes| no",
                                 progress=False)
    took = time.perf_counter() - t0
    info = run.params["api"]
    assert info["retries"] == 2 and info["failed"] == 0 and run.df["error"].isna().all()
    white = promptscope.run_prompt(TEMPLATE, hf, vars=CITIES[:1], choices=" yes| no",
                                   progress=False)
    assert run.df["logprob"].tolist() == pytest.approx(white.df["logprob"].tolist(), abs=1e-3)
    if fault == "429":  # Retry-After: 1 was honoured (twice, on whichever requests got it)
        assert took >= 1.0


def test_a_malformed_answer_is_retried_or_failed_and_never_cached(server, proxy, tmp_path):
    """An answer without choices is a passing fault: retried. One with the wrong number of
    choices would come back the same: a failed row at once. Neither is cached."""
    model = _proxied(proxy, server, cache=True, cache_path=tmp_path / "cache.sqlite",
                     max_retries=1, max_concurrency=1)
    proxy.inject("fewchoices")  # a target's one choice cut: no choices at all
    run = promptscope.run_prompt("Say {{hi|hello}}", model, target=" there", progress=False)
    assert run.df["error"].isna().all() and run.params["api"]["retries"] == 1
    proxy.inject("fewchoices")  # two choices asked, one answered
    bad = promptscope.run_prompt(TEMPLATE, model, vars=CITIES[:1], choices=" yes| no",
                                 progress=False)
    assert bad.params["api"]["retries"] == 0 and bad.params["api"]["failed"] == 1
    assert bad.params["api"]["prompt_tokens"] > 0  # refused, but billed: counted
    assert "1 choices, expected 2" in bad.df["error"].dropna().iloc[0]
    before = proxy.counts["/v1/completions"]
    again = promptscope.run_prompt(TEMPLATE, model, vars=CITIES[:1], choices=" yes| no",
                                   progress=False)
    assert again.df["error"].isna().all()  # asked again, not replayed from the cache
    assert proxy.counts["/v1/completions"] == before + 1


def test_out_of_quota_stops_at_once_with_the_reason(server, proxy):
    model = _proxied(proxy, server, max_retries=3)
    proxy.inject("quota")
    before = proxy.counts["/v1/completions"]
    with pytest.raises(APIRequestError, match="exceeded your current quota.*out of quota"):
        model.score(["Hi"], [" there"])
    assert proxy.counts["/v1/completions"] == before + 1  # not retried
    # what was answered (and billed) before the refusal is kept in the session
    one_at_a_time = _proxied(proxy, server, max_concurrency=1)
    proxy.inject("ok", "ok", "quota")  # the third prompt's request is refused
    with pytest.raises(APIRequestError) as err:
        promptscope.run_prompt(TEMPLATE, one_at_a_time, vars=CITIES, choices=" yes| no",
                               progress=False)
    kept = promptscope.load(err.value.partial_result.session_id)
    answered = kept.df[kept.df["error"].isna()]
    # the first two, and the one a worker may have picked up as the refusal came in
    assert {0, 1} <= set(answered["variant"]) and answered["variant"].nunique() in (2, 3)
    assert len(kept.df) == 12 and kept.df["error"].dropna().str.contains("quota").all()


def test_a_server_briefly_away_does_not_turn_off_chat_scoring(server, proxy):
    """/tokenize failing once is retried (it used to disable the chat template for good)."""
    from promptscope.models.openai_api import ChatText

    model = _proxied(proxy, server)
    proxy.inject("500", path="/tokenize")
    text = model._templated(ChatText("Hello there"))
    assert text is not None and "Hello there" in text
    assert proxy.counts["/tokenize"] == 2
    # A stopped run does not wait out the retries' backoff (a worker thread holds the run's
    # stop event).
    slow = _proxied(proxy, server, backoff=20.0, max_backoff=20.0)
    proxy.inject("500", "500", path="/tokenize")
    stop, took = threading.Event(), []

    def worker() -> None:
        openai_api._local.stop = stop
        t0 = time.perf_counter()
        took.append((slow._templated(ChatText("Good day")), time.perf_counter() - t0))

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.5)
    stop.set()
    thread.join(timeout=30)
    assert took and took[0][0] is None and took[0][1] < 5


def test_a_request_that_keeps_failing_is_a_failed_row_and_the_run_goes_on(server, proxy,
                                                                          capsys):
    model = _proxied(proxy, server, max_retries=2, max_concurrency=1, prices={"input": 1.0,
                                                                              "output": 2.0})
    proxy.inject("500", "500", "500")  # the first request fails three times: for good
    run = promptscope.run_prompt(TEMPLATE, model, vars=CITIES, choices=" yes| no",
                                 progress=False)
    info = run.params["api"]
    assert info["failed"] == 1 and info["retries"] == 2 and info["requests"] == 6
    assert info["cost_usd"] == pytest.approx(
        (info["prompt_tokens"] * 1.0 + info["completion_tokens"] * 2.0) / 1e6)
    failed = run.df[run.df["error"].notna()]
    assert len(failed) == 2 and failed["variant"].nunique() == 1
    assert "HTTP 500" in failed["error"].iloc[0] and failed["prob"].isna().all()
    assert run.df["error"].isna().sum() == 10 and run.status == "done"
    assert "1 FAILED" in capsys.readouterr().err
    summary = run.summary()  # the failed variant is listed, with no answer and its error
    assert len(summary) == 6 and summary["top_choice"].isna().sum() == 1
    assert "HTTP 500" in summary.loc[summary["top_choice"].isna(), "error"].iloc[0]
    back = promptscope.load(run.session_id)
    assert back.params["api"]["failed"] == 1 and len(back.df) == 12

    impatient = _proxied(proxy, server, timeout=0.5, max_retries=0)
    proxy.inject("slow:2", path="/v1/completions")
    gen = promptscope.run_prompt("Hi {{a|b}}", impatient, max_new_tokens=2, progress=False)
    assert gen.df["error"].notna().sum() == 1
    assert "timed out" in gen.df["error"].dropna().iloc[0]


def test_the_key_reaches_no_store_output_log_or_error(server, proxy, capsys, caplog,
                                                      _isolated_store):
    model = _proxied(proxy, server, api_key=SECRET, cache=True, max_retries=0)
    run = promptscope.run_prompt(TEMPLATE, model, vars=CITIES, choices=" yes| no")
    proxy.inject("500")
    promptscope.run_prompt("Hi {{a|b}}", model, max_new_tokens=2)
    proxy.inject(f"401:Incorrect API key provided: {SECRET}.")
    with pytest.raises(APIRequestError) as err:
        promptscope.run_prompt("Hello {{a|b}}", model, target=" x", progress=False)
    assert "API key" in str(err.value) and SECRET not in str(err.value)
    partial = err.value.partial_result
    assert partial.status == "failed"
    text = repr(model) + str(model.describe()) + run._repr_html_() + str(run.params)
    out = capsys.readouterr()
    text += out.out + out.err + caplog.text
    assert SECRET not in text
    files = [p for p in Path(_isolated_store).rglob("*") if p.is_file()]
    assert any(p.name.startswith("api_cache") for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
        assert b"SECRETkey" not in path.read_bytes(), path


def test_continuations_that_start_inside_a_multibyte_character(hf, api):
    """vLLM writes a character split over byte tokens on its last piece and "" on the others;
    a continuation starting with such a character (no space before it) lost those pieces."""
    conts = ["日本", "🙂", " 日本", " café", "naïve"]
    black = api.score(["Answer:"] * len(conts), conts)
    white = hf.score(["Answer:"] * len(conts), conts)
    assert [b.error for b in black] == [None] * len(conts)
    assert [b.logprob for b in black] == pytest.approx([w.logprob for w in white], abs=1e-3)
    assert [len(b.tokens) for b in black] == [len(w.tokens) for w in white]


def test_a_server_that_ignores_echo_is_not_scored_by_echo(server, proxy):
    """Its generated tokens would be taken for the prompt's: the probe checks the prompt came
    back (and nothing else with max_tokens=0)."""
    model = OpenAIModel(server[2], base_url=proxy.url, name="no-echo", cache=False)
    proxy.inject("noecho", "noecho")  # the probe's max_tokens=0 and =1 requests
    assert model.scoring_method(False) == "top_logprobs"


def test_no_key_sent_and_fatal_errors_off_the_scoring_path_are_clear(server, proxy):
    proxy.inject("401:Missing bearer token", path="/v1/models")
    with pytest.raises(ModelLoadError, match="wants an API key .* none was sent"):
        OpenAIModel(server[2], base_url=proxy.url)
    model = _proxied(proxy, server)
    proxy.inject("401:bad key")
    with pytest.raises(APIRequestError, match="top 5 next tokens.*rejected the API key"):
        model.top_tokens([1, 2, 3], 5)


def test_posix_names_a_failed_generation_instead_of_an_empty_response(server, proxy):
    model = _proxied(proxy, server, max_retries=0, max_concurrency=1)
    proxy.inject("500")  # the first variant's generation
    with pytest.warns(UserWarning, match="1 responses could not be generated"):
        run = promptscope.posix([{"q": "Is Paris in Europe"}], model, template="Q: {q}? A:",
                                n_variants=3, max_new_tokens=2, save=False, progress=False)
    assert run.params["failed_generations"] == 1
    assert run.params["dropped_empty_responses"] == 0
    assert "HTTP 500" in run.tables["variants"]["error"].dropna().iloc[0]


def test_unknown_model_and_fatal_errors_are_short(server, proxy):
    with pytest.raises(ModelLoadError, match="does not serve 'nope'.*tiny|does not serve"):
        OpenAIModel("nope", base_url=server[0])
    model = _proxied(proxy, server)
    proxy.inject("401:bad key")
    with pytest.raises(PromptscopeError, match="rejected the API key"):
        model.score(["Hi"], [" there"])


def test_notebook_runs_against_the_server(server, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PROMPTSCOPE_API_BASE_URL", server[0])
    monkeypatch.setenv("PROMPTSCOPE_API_MODEL", server[2])
    monkeypatch.setenv("PROMPTSCOPE_API_MODEL_DIR", str(server[1]))
    monkeypatch.setenv("PROMPTSCOPE_API_KEY", SECRET)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.get("promptscope", {}).get("needs") == "api-server"
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = nbformat.writes(nb)
    assert SECRET not in text
    assert "cdn.plot.ly" not in text and "application/vnd.plotly.v1+json" in text
    assert "agree" in text and "from the cache" in text
    assert "same control prompts: True" in text  # greedy reachability through the endpoint
    for folder in (tmp_path, Path(os.environ["PROMPTSCOPE_HOME"])):
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
