"""The in-process Python API: generate, stream, async variants, deadlines, threads, close."""

from __future__ import annotations

import asyncio
import threading

import pytest

import edge_runtime
from edge_runtime.errors import EdgeRuntimeError
from tests.helpers import packed_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    return packed_llama(tmp_path_factory.mktemp("api"), act="relu", seed=21)


@pytest.fixture()
def rt(model_dir):
    with edge_runtime.load(model_dir, backend="cpu") as runtime:
        yield runtime


def test_stream_concatenates_to_generate(rt):
    kw = {"max_new_tokens": 20, "temperature": 0.8, "seed": 5}
    pieces = list(rt.stream("the lazy dog", **kw))
    assert len(pieces) > 1
    assert "".join(pieces) == rt.generate("the lazy dog", **kw).text


def test_messages_use_default_template(rt):
    """A model without a chat template gets the default one: the system text, then "Role: content" lines, then
    the assistant's cue; its stop strings end the reply at the next turn."""
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "open the door\n"},
                {"role": "assistant", "content": "Which door?"}, {"role": "user", "content": "the red one"}]
    assert rt.model.manifest.get("chat_template") is None
    ids, stops = rt.prepare_prompt(messages)
    assert ids == rt.encode("Be brief.\n\nUser: open the door\nAssistant: Which door?\nUser: the red one\nAssistant:")
    assert "\nUser:" in stops
    res = rt.generate(messages, max_new_tokens=5)
    assert res.prompt_tokens == len(ids) and len(res.token_ids) <= 5


def test_bad_messages(rt):
    with pytest.raises(EdgeRuntimeError, match="role"):
        rt.generate([{"role": "robot", "content": "x"}])


def test_deadline_returns_partial(rt):
    import time

    rt.token_listeners.append(lambda _t: time.sleep(0.002))  # a slow device: 1,000 tokens take over 2 s
    res = rt.generate("the quick", max_new_tokens=1000, deadline_s=0.05)
    rt.token_listeners.pop()
    assert res.finish_reason == "deadline" and 1 <= len(res.token_ids) < 1000
    assert res.token_ids == rt.generate("the quick", max_new_tokens=len(res.token_ids)).token_ids  # a prefix


def test_a_deadline_already_passed_runs_nothing(rt):
    """A call late before it starts (deadline 0) decodes nothing: its prefill could cost seconds on a long
    prompt. A bad prompt is still refused as such."""
    res = rt.generate("the quick", max_new_tokens=10, deadline_s=0.0)
    assert res.finish_reason == "deadline" and res.token_ids == [] and rt.last_result is res
    with pytest.raises(EdgeRuntimeError, match="context holds"):
        rt.generate(list(range(1, rt.decoder.max_context + 5)), deadline_s=0.0)


def test_async_variants(rt):
    async def main():
        full = await rt.agenerate("a robot walks", max_new_tokens=12)
        pieces = [p async for p in rt.astream("a robot walks", max_new_tokens=12)]
        return full, pieces

    full, pieces = asyncio.run(main())
    assert "".join(pieces) == full.text and len(full.token_ids) == 12


def test_astream_early_exit_releases_runtime(rt):
    async def main():
        async for _piece in rt.astream("a robot walks", max_new_tokens=200):
            break

    asyncio.run(main())
    assert rt.generate("a robot", max_new_tokens=3).finish_reason == "length"  # not deadlocked


def test_threads_get_their_own_results(rt):
    expected = {s: rt.generate("the door", max_new_tokens=10, temperature=1.0, seed=s).text for s in range(6)}
    got: dict[int, str] = {}

    def worker(seed):
        got[seed] = rt.generate("the door", max_new_tokens=10, temperature=1.0, seed=seed).text

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert len(set(expected.values())) > 1  # the seeds really differ


def test_closed_runtime_refuses(model_dir):
    rt = edge_runtime.load(model_dir, backend="cpu")
    rt.close()
    with pytest.raises(EdgeRuntimeError, match="closed"):
        rt.generate("x")


@pytest.mark.parametrize("call, message", [
    (lambda rt: rt.generate([1, 10**6]), "outside the vocabulary"),
    (lambda rt: rt.generate(b"the door"), "bytes"),
    (lambda rt: rt.generate("\udcff door"), "not valid UTF-8"),
    (lambda rt: rt.generate("x", stop=[""]), "non-empty"),
    (lambda rt: rt.generate(None), "prompt must be a string.*got NoneType"),
    (lambda rt: rt.generate(7), "prompt must be a string.*got int"),
    (lambda rt: rt.generate("x", deadline_s=float("nan")), "deadline_s"),
    (lambda rt: rt.generate("x", max_new_tokens=2.5), "max_new_tokens"),
    (lambda rt: rt.set_sparsity(float("nan")), "alpha"),
    (lambda rt: rt.set_sparsity(0.0), "alpha"),
    (lambda rt: rt.set_sparsity([-1.0] * rt.config.n_layers), "alpha"),
])
def test_bad_arguments_are_refused_and_lose_nothing(rt, call, message):
    before = rt.generate("the door", max_new_tokens=6).token_ids
    with pytest.raises(EdgeRuntimeError, match=message):
        call(rt)
    assert rt.generate("the door", max_new_tokens=6).token_ids == before


def test_numpy_values_are_accepted(rt):
    """A robot's code carries numpy scalars and arrays: they are numbers like any other."""
    import numpy as np

    rt.set_sparsity(np.full(rt.config.n_layers, 1.05))
    assert rt.decoder.alphas == [1.05] * rt.config.n_layers
    rt.set_sparsity(None)
    res = rt.generate(np.array([1, 5, 6]), max_new_tokens=np.int64(4), deadline_s=np.float32(5.0),
                      temperature=np.float32(0.0))
    assert res.token_ids == rt.generate([1, 5, 6], max_new_tokens=4).token_ids


def test_stop_none_means_no_stop_strings(rt):
    assert rt.generate("the door", max_new_tokens=8, stop=None).token_ids == rt.generate("the door",
                                                                                         max_new_tokens=8).token_ids


def test_one_stop_string_is_not_split_into_characters(rt):
    full = rt.generate("the door", max_new_tokens=20)
    stop = full.text[:3] + "\x00"  # its characters occur in the output, the string does not
    assert rt.generate("the door", max_new_tokens=20, stop=stop).text == full.text


def test_generation_on_the_thread_of_an_open_stream_is_refused(rt):
    """The open stream holds the runtime's lock: waiting for it on the same thread would hang forever."""
    full = rt.generate("the door", max_new_tokens=12).text
    it = rt.stream("the door", max_new_tokens=12)
    first = next(it)
    with pytest.raises(EdgeRuntimeError, match="still open"):
        rt.generate("x")
    assert first + "".join(it) == full  # the stream itself is unharmed
    assert rt.generate("the door", max_new_tokens=12).text == full


def test_a_stream_handed_to_another_thread_is_waited_for(rt):
    """The lock belongs to whichever thread resumed the stream last: once a worker has taken it over, the
    thread that started it waits for it like any other (waiting ends, so it must not be refused)."""
    import time

    full = rt.generate("the door", max_new_tokens=12).text
    it = rt.stream("the door", max_new_tokens=12)
    first = next(it)
    rest: list[str] = []
    resumed = threading.Event()

    def finish_on_worker():
        rest.append(next(it))
        resumed.set()
        time.sleep(0.2)  # the starting thread is asking for the lock meanwhile
        rest.extend(it)

    worker = threading.Thread(target=finish_on_worker)
    worker.start()
    assert resumed.wait(60)
    assert rt.generate("the door", max_new_tokens=12).text == full
    worker.join(60)
    assert first + "".join(rest) == full


def test_deadline_and_should_stop_count_the_wait_for_another_threads_generation(rt):
    """A control loop's 0.2 s deadline behind another thread's long generation blocked for that whole
    generation; now it returns when the deadline passes, with no token (none could be decoded in time)."""
    import time

    full = rt.generate("the door", max_new_tokens=12)
    it = rt.stream("the door", max_new_tokens=12)
    first = next(it)  # this thread's open stream holds the lock until it ends
    results: dict = {}
    estop = threading.Event()

    def control_loop():
        t0 = time.monotonic()
        results["deadline"] = rt.generate("the door", max_new_tokens=12, deadline_s=0.2)
        results["deadline_s"] = time.monotonic() - t0
        results["stopped"] = rt.generate("the door", max_new_tokens=12,
                                         should_stop=lambda: "cancelled" if estop.is_set() else None)

    worker = threading.Thread(target=control_loop)
    worker.start()
    time.sleep(0.5)
    estop.set()
    worker.join(10)
    assert not worker.is_alive(), "the waiting generation did not give up"
    res = results["deadline"]
    assert res.finish_reason == "deadline" and res.token_ids == [] and res.text == ""
    assert 0.2 <= results["deadline_s"] < 1.5  # it waited for the whole stream (forever here)
    assert results["stopped"].finish_reason == "cancelled" and results["stopped"].token_ids == []
    assert first + "".join(it) == full.text  # the stream that held the lock is unharmed
    assert rt.generate("the door", max_new_tokens=12, deadline_s=60).token_ids == full.token_ids


def test_close_on_the_thread_of_an_open_stream_ends_it(model_dir):
    rt = edge_runtime.load(model_dir, backend="cpu")
    it = rt.stream("the door", max_new_tokens=50)
    next(it)
    rt.close()  # returns: it must not wait for the lock this thread's stream holds
    assert len(list(it)) <= 1  # at most the held-back text; no new token is decoded
    assert rt.decoder is None
    with pytest.raises(EdgeRuntimeError, match="closed"):
        rt.generate("x")


def test_close_from_another_thread_waits_for_the_generation(model_dir):
    rt = edge_runtime.load(model_dir, backend="cpu")
    errors: list[Exception] = []
    done = threading.Event()

    def robot_loop():
        try:
            for _ in range(10**6):
                rt.generate("the door", max_new_tokens=8)
                done.set()
        except Exception as e:  # the first call after close() must say so, nothing else
            errors.append(e)

    worker = threading.Thread(target=robot_loop)
    worker.start()
    assert done.wait(60)
    rt.close()
    worker.join(60)
    assert len(errors) == 1 and isinstance(errors[0], EdgeRuntimeError) and "closed" in str(errors[0])
    with pytest.raises(EdgeRuntimeError, match="closed"):
        rt.ffn_stats()


def test_warm_up_leaves_no_trace(model_dir):
    """load() warms the kernels up by default; what it ran is forgotten: the same generation and statistics as
    a runtime that was not warmed, and no token listener hears the warm-up."""
    kw = {"max_new_tokens": 12, "temperature": 0.7, "seed": 3}
    with edge_runtime.load(model_dir, backend="cpu", warm_up=False) as cold:
        cold.set_sparsity(1.1)  # SparseInfer, so that statistics are kept
        heard = []
        cold.token_listeners.append(heard.append)
        cold.warm_up()
        assert heard == [] and cold.decoder.pos == 0
        warmed = cold.generate("the quick brown fox", **kw)
        warmed_stats = cold.ffn_stats()
    with edge_runtime.load(model_dir, backend="cpu", warm_up=False) as fresh:
        fresh.set_sparsity(1.1)
        first = fresh.generate("the quick brown fox", **kw)
        assert first.token_ids == warmed.token_ids and first.text == warmed.text
        assert fresh.ffn_stats() == warmed_stats and warmed_stats["decode_steps"] == 11
    rt = edge_runtime.load(model_dir, backend="cpu")
    rt.close()
    with pytest.raises(EdgeRuntimeError, match="closed"):
        rt.warm_up()


@pytest.mark.parametrize("which", ["embedded", "uncalibrated"])
def test_robot_example_follows_the_device_policy(model_dir, which, capsys, monkeypatch):
    """examples/robot_command_loop.py: the embedded model is calibrated, so the profile policy picks its
    sparsity; a model without a calibration falls back to its stored alpha. Either way a cycle is answered."""
    import runpy
    import sys
    from pathlib import Path

    argv = ["robot_command_loop.py", "--cycles", "1", "--deadline-ms", "2000"]
    argv += ["--model", str(model_dir)] if which == "uncalibrated" else []
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "robot_command_loop.py"), run_name="__main__")
    first, cycle = capsys.readouterr().out.splitlines()[:2]
    assert ("policy" in first) == (which == "embedded") and "decode: sparse" in first
    assert cycle.startswith("cycle 0: 'The door ahead is closed.' -> ")


@pytest.mark.parametrize("bad", [-5, 0, 1, 2.5, "64", True])
def test_max_context_is_checked(bad):
    """-5 failed inside numpy, 2.5 and "64" with TypeErrors, 0 meant the default; 1 holds no token to generate."""
    with pytest.raises(EdgeRuntimeError, match="max_context must be a whole number of positions, at least 2"):
        edge_runtime.load(None, profile=None, backend="cpu", max_context=bad)


@pytest.mark.parametrize("ctx", [2, 3])
def test_the_smallest_contexts_warm_up_and_generate(ctx, capsys):
    """The warm-up (a two-token prompt and two steps) needs four positions: smaller contexts failed at load with
    'context full', an error about the warm-up, not the user's prompt."""
    from edge_runtime.cli import main

    rt = edge_runtime.load(None, profile=None, backend="cpu", max_context=ctx)
    res = rt.generate([1], max_new_tokens=10)
    assert len(res.token_ids) == ctx and res.finish_reason == "context"  # the last one needs no KV position
    code = main(["generate", "--max-context", str(ctx), "--prompt", "The", "--max-new-tokens", "5"])
    err = capsys.readouterr().err
    if ctx == 3:
        assert code == 0 and "finish: context" in err
    else:  # "The" is two tokens with BOS: no room left, and the error is about the prompt, not the warm-up
        assert code == 2 and "prompt has 2 tokens; the context holds 2" in err


def test_a_context_past_the_model_is_said_once():
    """The default model has 512 positions: a larger max_context is cut to them with a warning, not silently."""
    from edge_runtime.devices.planner import KVBudgetWarning

    for profile in (None, "auto"):  # "auto" (the default) plans memory first, with the context cut there
        with pytest.warns(KVBudgetWarning, match="max_context 4096 is past the 512 positions"):
            rt = edge_runtime.load(None, profile=profile, backend="cpu", max_context=4096, warm_up=False)
        assert rt.decoder.max_context == 512


def _in_thread(fn, timeout: float = 30.0) -> list:
    """fn's result in a list, [] when it did not return within timeout (the thread is left behind: daemon)."""
    done = []
    t = threading.Thread(target=lambda: done.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    return done


def test_a_should_stop_that_raises_leaves_the_runtime_usable(model_dir):
    """The host's e-stop callback raising (its topic gone) used to leave the lock held for good: every later call
    without a deadline, and close(), blocked forever. (Its own runtime: a wedged one is never closed here.)"""
    rt = edge_runtime.load(model_dir, backend="cpu")
    calls = []

    def estop():
        calls.append(1)
        raise ConnectionError("e-stop topic unavailable")

    with pytest.raises(ConnectionError):
        rt.generate("the lazy dog", max_new_tokens=8, should_stop=estop)
    assert calls and not rt._lock.locked()
    done = _in_thread(lambda: rt.generate("the lazy dog", max_new_tokens=4))
    assert done and len(done[0].token_ids) == 4
    assert _in_thread(rt.close) == [None]


def test_should_stop_may_be_an_events_is_set(rt):
    """estop.is_set returns False: it crashed every call ('NoneType' object has no attribute 'cfg'), and True gave
    the finish reason True; a threading.Event itself (not callable) is a clear error."""
    estop = threading.Event()
    res = rt.generate("the lazy dog", max_new_tokens=5, should_stop=estop.is_set)
    assert len(res.token_ids) == 5 and res.finish_reason == "length"
    pieces = list(rt.stream("the lazy dog", max_new_tokens=5, should_stop=estop.is_set))
    assert "".join(pieces) == res.text
    estop.set()
    assert rt.generate("the lazy dog", max_new_tokens=5, should_stop=estop.is_set).finish_reason == "cancelled"
    assert rt.generate("the lazy dog", max_new_tokens=5, should_stop=lambda: "e-stop").finish_reason == "e-stop"
    with pytest.raises(EdgeRuntimeError, match="should_stop must be a function.*pass its is_set"):
        rt.generate("the lazy dog", max_new_tokens=5, should_stop=estop)


def test_cancelling_agenerate_stops_its_generation(rt):
    """asyncio.wait_for's timeout cancels the task; the generation in the worker thread used to run on to its end
    (900 tokens here) and the next call waited for it. astream takes a should_stop too (it was a TypeError)."""
    import time

    def slow():  # 2 ms a token: 900 tokens take about 2 s
        time.sleep(0.002)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(rt.agenerate("a robot walks", max_new_tokens=900, stop=(), should_stop=slow), 0.1)
        t0 = time.perf_counter()
        nxt = await rt.agenerate("a robot walks", max_new_tokens=1)
        waited = time.perf_counter() - t0
        pieces = [p async for p in rt.astream("a robot walks", max_new_tokens=50, should_stop=lambda: True)]
        return nxt, waited, pieces

    nxt, waited, pieces = asyncio.run(main())
    assert len(nxt.token_ids) == 1 and waited < 1.0, waited
    assert pieces == [] and rt.last_result.finish_reason == "cancelled"


def test_a_child_forked_after_the_kernels_ran_gets_a_clear_error():
    """numba ended such a child at its first parallel kernel ("fork() called from a process already using GNU
    OpenMP"): a multiprocessing Pool's workers died and its map waited forever. Now one EdgeRuntimeError."""
    import os

    import numba

    rt = edge_runtime.load(None, profile=None, backend="cpu", threads=2)
    rt.generate("the lazy dog", max_new_tokens=4)
    if numba.threading_layer() != "omp":
        pytest.skip(f"numba's {numba.threading_layer()} threading layer survives fork")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what generate does, then leave without running pytest's cleanup
        try:
            rt.generate("the lazy dog", max_new_tokens=4)
            msg = "generated"
        except EdgeRuntimeError as e:
            msg = f"EdgeRuntimeError: {e}"
        except BaseException as e:  # reported to the parent, whatever it is
            msg = f"{type(e).__name__}: {e}"
        os.write(write, msg.encode()[:4000])
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        msg = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, msg
    assert msg.startswith("EdgeRuntimeError: this process was forked after edge-runtime started") and "'spawn'" in msg
    assert len(rt.generate("the lazy dog", max_new_tokens=4).token_ids) == 4  # the parent is unaffected


def test_close_gives_back_the_mappings_without_the_garbage_collector(model_dir):
    """A closed runtime the application still holds kept its weights (fp32 copies too) and mapped files, and a
    deleted one waited for the cyclic garbage collector (the fused step points back at its backend)."""
    import gc

    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return sum(str(model_dir) in line for line in f)

    before = mapped()
    gc.disable()
    try:
        rt = edge_runtime.load(model_dir, backend="cpu")
        rt.generate("the lazy dog", max_new_tokens=8)
        assert mapped() > before
        rt.close()
        assert mapped() == before and rt.backend is None and not rt.model.matrices
        with pytest.raises(EdgeRuntimeError, match="closed"):
            rt.generate("the lazy dog", max_new_tokens=8)
    finally:
        gc.enable()


def test_two_runtimes_on_one_model_each_keep_the_weights_until_the_last_closes(model_dir):
    """Closing one of two runtimes built on one PackedModel emptied the other's model.matrices; and a runtime
    built on a model whose last runtime was closed failed inside the backend instead of saying why."""
    from edge_runtime.pack.loader import load_packed
    from edge_runtime.runtime import Runtime

    model = load_packed(model_dir)
    first, second = Runtime(model, backend="cpu"), Runtime(model, backend="cpu")
    want = first.generate("the lazy dog", max_new_tokens=6, temperature=0).token_ids
    first.close()
    first.close()  # a second close (an explicit one, then the with-block's) counts it out once
    assert model.matrices and second.generate("the lazy dog", max_new_tokens=6, temperature=0).token_ids == want
    with pytest.raises(EdgeRuntimeError, match="unknown prefill"):
        Runtime(model, backend="cpu", prefill="bogus")  # a runtime that failed to build holds nothing
    second.close()
    assert not model.matrices
    with pytest.raises(EdgeRuntimeError, match="released when the last runtime using it was closed"):
        Runtime(model, backend="cpu")


@pytest.mark.parametrize("stop", [b".", 123, 1.5])
def test_a_stop_that_is_not_text_is_named(rt, stop):
    """b"." gave "stop strings must be non-empty strings, got 46" (its first byte), 123 a bare TypeError."""
    expected = f"stop must be a string or a list of strings, got {type(stop).__name__}"
    with pytest.raises(EdgeRuntimeError, match=expected):
        rt.generate("the lazy dog", max_new_tokens=4, stop=stop)


def test_a_setting_changed_from_another_thread_waits_for_the_running_token(rt):
    """The kernels run without the GIL: a knob written mid-token would reach some layers and not others. The
    backend's step lock (held through each token, here by the test) makes the change wait for the token's end."""
    be = rt.backend
    rt.set_sparsity(1.0)
    with be._between_steps:  # as a running token holds it
        t = threading.Thread(target=rt.set_sparsity, args=(0.5,), daemon=True)
        t.start()
        t.join(0.3)
        assert t.is_alive() and float(be.state.alpha[0]) == 1.0  # waiting: nothing written inside the token
    t.join(10)
    assert not t.is_alive() and float(be.state.alpha[0]) == 0.5  # applied once the token ended


def test_close_while_another_thread_changes_a_setting_says_closed(model_dir):
    """close() takes the settings lock too: a set_sparsity racing it meets 'closed', not a freed backend."""
    rt = edge_runtime.load(model_dir, backend="cpu")
    with rt._configuring:  # a setting being changed on another thread
        closing = threading.Thread(target=rt.close, daemon=True)
        closing.start()
        closing.join(0.2)
        assert closing.is_alive() and rt.backend is not None  # close waits for the setting
    closing.join(10)
    with pytest.raises(EdgeRuntimeError, match="closed"):
        rt.set_sparsity(0.5)
