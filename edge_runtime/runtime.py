"""The in-process runtime: a packed model, a backend, a decoder and a tokenizer behind one object.

One generation runs at a time (one KV cache); calls from several threads queue on a lock in arrival
order of the lock (not strictly FIFO). `stream` holds the lock while its iterator is alive; closing
the iterator (or leaving a `for` loop early) releases it. A second generation on the thread whose stream
is still open is refused (waiting for that lock would never end); close() there ends the stream at its
next token and releases the model when the stream ends.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from edge_runtime.backends import create_backend
from edge_runtime.backends.fork_guard import check_not_forked
from edge_runtime.backends.room import OutOfRoomError, RoomWarning
from edge_runtime.devices.planner import KVBudgetWarning, LoadPlan
from edge_runtime.devices.power import PowerModeWarning
from edge_runtime.devices.profile import DeviceProfile
from edge_runtime.devices.sizes import DEFAULT_KV_TOKENS
from edge_runtime.errors import EdgeRuntimeError, install_extra
from edge_runtime.model.chat import DEFAULT_STOP, check_messages, render_chat
from edge_runtime.model.chat_encoding import encode_chat
from edge_runtime.model.decoder import Decoder
from edge_runtime.model.generate import GenerationConfig, GenerationResult, Piece, check_prompt, generate_stream
from edge_runtime.model.sampling import SamplingParams, finite, is_int
from edge_runtime.model.tokenizer import Tokenizer
from edge_runtime.monitor.token_log import TOKEN_LOG_ENV
from edge_runtime.pack.loader import PackedModel, load_packed
from edge_runtime.paths import resolve_model
from edge_runtime.sparsity.calibrate import attention_criterion, attention_teal, rules_for
from edge_runtime.sparsity.calibration_files import read_calibration
from edge_runtime.sparsity.policy import Objective, Selection, choose_predictor, quality_cap, select

DEFAULT_CONTEXT = 2048
LOCK_POLL_S = 0.005  # how often a generation waiting for another thread's generation asks its should_stop
FALLBACK_ALPHA = 1.0  # SparseInfer's majority vote, for models converted without a default alpha

Prompt = str | Sequence[int] | Sequence[dict[str, str]]
MIN_CONTEXT = 2  # one prompt token and one to generate


def check_max_context(asked: object) -> int | None:
    """A max_context the caller gave: None (the default) or a whole number of positions >= MIN_CONTEXT. A negative
    one used to fail inside numpy ("buffer size must be a multiple of element size"), and 0 meant the default."""
    if asked is not None and (not is_int(asked) or asked < MIN_CONTEXT):
        raise EdgeRuntimeError(f"max_context must be a whole number of positions, at least {MIN_CONTEXT} (one prompt "
                               f"token and one to generate), got {asked!r}")
    return asked


def context_for(asked: int | None, positions: int) -> int:
    """The KV positions to allocate: asked (default DEFAULT_CONTEXT), at most the model's trained positions; more
    than those is said once, as a KVBudgetWarning (the CLI prints it as a warning line)."""
    if asked is not None and asked > positions:
        warnings.warn(KVBudgetWarning(f"max_context {asked} is past the {positions} positions this model was "
                                      f"trained for; the context holds {positions}"), stacklevel=3)
    return min(asked or DEFAULT_CONTEXT, positions)


class Runtime:
    def __init__(self, model: PackedModel, backend: str = "auto", max_context: int | None = None,
                 prefill: str = "native", threads: int | None = None):
        model.check_not_released()
        self.model = model
        ctx = context_for(check_max_context(max_context), model.config.max_positions)
        self.backend = create_backend(backend, model, ctx, threads)
        self.decoder = Decoder(self.backend)
        self.prefill = None  # an OnnxPrefill when prompts run through ONNX Runtime
        if prefill == "onnx":
            self.prefill = onnx_prefill(model, ctx)
            self.decoder.external_prefill = self.prefill
        elif prefill != "native":
            raise EdgeRuntimeError(f"unknown prefill {prefill!r}; choose native or onnx")
        path = model.tokenizer_path
        self.tokenizer = Tokenizer(path) if path else None
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread holding _lock for a generation or warm-up
        # Serialises changes of the sparse setting (the watcher's thread and the application's may race): the
        # selection, the knobs in the decoder and power_mode must name one mode. Re-entrant: use_profile
        # calls set_power_mode, which calls _apply.
        self._configuring = threading.RLock()
        self._closed = False
        self.last_result: GenerationResult | None = None
        calibrated = read_calibration(model.path)
        self.calibration, self.thresholds = calibrated if calibrated else (None, {})
        self.predictor = "auto"  # which calibrated predictor the policy may pick: auto | sparseinfer | projection
        self.predictor_in_use: str | None = None  # "auto" resolved once per model and objective, not per mode
        self.memory_plan: LoadPlan | None = None  # set by load() when a profile is in use
        self.profile: DeviceProfile | None = None
        self.power_mode: str | None = None
        self.objective = Objective()
        self.selection: Selection | None = None
        self._policy_drives_sparsity = False  # True: every (re)selection is applied to the decoder
        self._watcher = None
        # Called with time.monotonic() as each token is produced (the monitor's per-token hook).
        self.token_listeners: list[Callable[[float], None]] = []
        log = os.environ.get(TOKEN_LOG_ENV)
        if log:  # `edge-runtime monitor -- COMMAND` asks its child for token times this way
            self._token_log = open(log, "a", buffering=1)  # noqa: SIM115 (closed in close())
            self.token_listeners.append(self._log_token)
        else:
            self._token_log = None
        model.acquire()  # last: a runtime that failed to build does not hold the model's arrays
        self._holds_model = True

    def _log_token(self, t: float) -> None:
        """One token time for the monitor. A write that fails (its disk full) ends the log with one warning:
        the monitor's view is lost, the generation is not."""
        try:
            self._token_log.write(f"{t:.6f}\n")
        except (OSError, ValueError) as e:  # ValueError: the file was closed
            print(f"edge-runtime: warning: cannot write token times to {self._token_log.name} "
                  f"({getattr(e, 'strerror', None) or e}); the monitor gets no more of them", file=sys.stderr)
            self.token_listeners.remove(self._log_token)
            with suppress(OSError):  # its unwritten line would fail again
                self._token_log.close()
            self._token_log = None

    # ---- configuration -----------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def name(self) -> str:
        """The model's id in the daemon: the packed directory's name."""
        return self.model.path.resolve().name

    @property
    def default_alpha(self) -> float:
        """The alpha stored with the model at conversion (--default-alpha), else FALLBACK_ALPHA."""
        return float((self.model.manifest.get("sparsity") or {}).get("default_alpha", FALLBACK_ALPHA))

    def set_sparsity(self, alphas: Sequence | float | None, measure_recall: bool = False) -> None:
        """A fixed setting chosen by the caller (per-layer alphas or rules, one alpha, or None for dense),
        applied between two tokens; power-mode changes no longer touch it until follow_policy(). None also
        drops the attention thresholds a sparse setting carried (a TEAL setting from set_teal stays)."""
        with self._configuring:
            decoder = self._live_decoder()
            self._policy_drives_sparsity = False
            if alphas is None and decoder.rules is not None:
                decoder.set_teal(None)
            decoder.set_sparsity(alphas, measure_recall)

    def follow_policy(self, measure_recall: bool = False) -> bool:
        """Let the profile policy drive sparse decode (now and on every power-mode change). False when
        there is no selection (no profile or no calibration): nothing changes then."""
        with self._configuring:
            if self.selection is None:
                return False
            self._policy_drives_sparsity = True
            self._apply(self.selection, measure_recall)
            return True

    def _apply(self, selection: Selection, measure_recall: bool) -> None:
        """A selection's predictor rules and attention TEAL thresholds into the decoder (next token on)."""
        decoder = self._live_decoder()
        try:
            decoder.set_teal(self.teal_for(selection), self.attention_criterion(selection))
        except OutOfRoomError as e:  # a robot's runtime keeps running: the FFN's sparsity, attention dense
            warnings.warn(f"{e}: attention TEAL is off for this selection", RoomWarning, stacklevel=3)
            decoder.set_teal(None)
            off = "; attention TEAL off: its weight copies do not fit (projections assume it)"
            selection.note += "" if selection.note.endswith(off) else off
        decoder.set_sparsity(self.rules_for(selection), measure_recall)

    def set_teal(self, target: float | None) -> None:
        """TEAL magnitude sparsity at a calibrated target (0.25, 0.4, 0.5 ...); None turns it off."""
        from edge_runtime.sparsity.teal import criterion_of, thresholds_for

        with self._configuring:
            decoder = self._live_decoder()
            if target is None:
                decoder.set_teal(None)
            else:
                if self.calibration is None or "teal" not in self.calibration:
                    raise EdgeRuntimeError(f"{self.model.path} has no TEAL calibration; run 'edge-runtime "
                                           f"calibrate' first")
                teal = self.calibration["teal"]
                decoder.set_teal(thresholds_for(teal, target), criterion_of(teal, target), dense_ffn=True)
            self._policy_drives_sparsity = False  # set: a power-mode change no longer replaces it

    def ffn_stats(self) -> dict:
        return self._live_decoder().stats.summary()

    def _live_decoder(self) -> Decoder:
        decoder = self.decoder
        if decoder is None:
            raise EdgeRuntimeError("this runtime is closed")
        return decoder

    # ---- device policy -----------------------------------------------------------------------------
    def use_profile(self, profile: DeviceProfile, power_mode: str | None = None,
                    objective: Objective | None = None, predictor: str | None = None) -> Selection | None:
        """Adopt a device profile and objective; with a calibration, select per-layer knobs now."""
        with self._configuring:
            self.profile = profile
            if objective is not None:
                self.objective = objective
            if predictor is not None:
                self.predictor = predictor
            self.predictor_in_use = self._resolve_predictor()
            self._policy_drives_sparsity = True
            return self.set_power_mode(profile.mode(power_mode).name)

    def _resolve_predictor(self) -> str | None:
        """The predictor for every power mode from now on: the one asked for, or for "auto" the one the
        calibration says reads the fewest bytes within the quality cap (policy.choose_predictor)."""
        if self.profile is None or self.calibration is None or not self.calibration["predictors"]:
            return None
        if self.predictor != "auto":
            return self.predictor
        return choose_predictor(self.calibration, quality_cap(self.profile, self.objective))

    def set_power_mode(self, mode: str) -> Selection | None:
        """The application (or the watcher) reports a new power mode: new alphas from the next token on,
        nothing reloaded, no graph recaptured. The mode is published after its alphas are in place."""
        with self._configuring:
            if self.profile is None:
                raise EdgeRuntimeError("no device profile in use; call use_profile first")
            name = self.profile.mode(mode).name
            self._select(name)
            self.power_mode = name
            return self.selection

    def reselect(self) -> Selection | None:
        """Select again for the current mode (after a change of objective or predictor: the predictor is
        resolved again here, never on a power-mode change)."""
        with self._configuring:
            self.predictor_in_use = self._resolve_predictor()
            return self._select(self.power_mode)

    def _select(self, mode: str | None) -> Selection | None:
        decoder = self._live_decoder()
        if (self.profile is None or self.calibration is None or not self.config.relu_family
                or not self.calibration["predictors"]):
            return None
        selection = select(self.calibration, self.config, self.model.manifest["encoding"], self.profile, mode,
                           self.objective, self.predictor_in_use or self.predictor,
                           kv_tokens=min(DEFAULT_KV_TOKENS, decoder.max_context))
        self.selection = selection
        if self._policy_drives_sparsity:
            self._apply(selection, decoder.measure_recall)
        return selection

    def health_info(self) -> dict:
        """What the daemon's /health reports about the device policy: profile and power mode, the
        predictor and the per-layer knobs the next token decodes with, the selection (target, cap, met,
        note; speeds are projections from the profile's bandwidth), the memory plan and the KV budget."""
        sel = self.selection
        decoder = self.decoder
        return {
            "profile": self.profile.name if self.profile else None,
            "power_mode": self.power_mode,
            "predictor": {"asked": self.predictor, "in_use": self.predictor_in_use},
            "decode": decoder.mode if decoder else None,  # dense | sparse | teal
            "attention_teal": bool(decoder and decoder.teal is not None),  # thresholds on q/k/v/o in force
            "knobs": decoder.alphas if decoder else None,  # per layer, in force for the next token
            "policy_drives_sparsity": self._policy_drives_sparsity,
            "selection": sel.to_dict() if sel else None,
            "memory": self.memory_plan.to_dict() if self.memory_plan else None,
            "kv_budget_tokens": decoder.max_context if decoder else None,
            "prefill": self.prefill.describe() if self.prefill else {"prefill": "native"},
        }

    def rules_for(self, selection: Selection) -> list:
        """The per-layer predictor rules a selection stands for (thresholds looked up for q)."""
        section = self.calibration["predictors"][selection.predictor]
        grid = section["grid"]
        return rules_for(selection.predictor, tuple(grid), self.thresholds, [grid.index(k) for k in selection.knobs])

    def teal_for(self, selection: Selection) -> list[dict[str, float]] | None:
        """The per-layer attention TEAL thresholds a selection stands for; None when it keeps attention dense."""
        section = self.calibration["predictors"][selection.predictor]
        return attention_teal(section.get("attention"), selection.attention)

    def attention_criterion(self, selection: Selection) -> str:
        """The criterion ("teal" or "wina") a selection's attention thresholds were calibrated for."""
        return attention_criterion(self.calibration["predictors"][selection.predictor].get("attention"))

    def watch_power_mode(self, read_mode, interval_s: float = 1.0) -> None:
        """Poll `read_mode()` (e.g. the nvpmodel reader) and re-select on every change. Stopped by close()."""
        from edge_runtime.devices.power import PowerModeWatcher

        self.stop_watching()
        self._watcher = PowerModeWatcher(read_mode, lambda m: m and self.set_power_mode(m), interval_s).start()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    # ---- prompts -----------------------------------------------------------------------------------
    def _text_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise EdgeRuntimeError(f"{self.model.path} has no tokenizer.json; text prompts need one")
        return self.tokenizer

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self._text_tokenizer().encode(prompt, add_special_tokens)

    def encode_chat(self, text: str, messages: Sequence[dict], render, add_special_tokens: bool) -> list[int]:
        """A rendered chat's ids: special-token text inside a message stays text (model/chat_encoding.py);
        render(messages) renders as text was rendered."""
        return encode_chat(self._text_tokenizer(), text, messages, render, add_special_tokens)

    def prepare_prompt(self, prompt: Prompt) -> tuple[list[int], tuple[str, ...]]:
        """Token ids and the stop strings the prompt form implies (the default chat template's)."""
        if isinstance(prompt, str):
            return self.encode(prompt), ()
        if isinstance(prompt, (bytes, bytearray)):  # list(b"hi") would be the ids [104, 105]
            raise EdgeRuntimeError("prompt is bytes; decode it to str first")
        try:
            items = list(prompt)
        except TypeError:  # None, a number: list() would name neither the argument nor what it takes
            raise EdgeRuntimeError(f"prompt must be a string, a list of token ids, or a list of chat messages, "
                                   f"got {type(prompt).__name__}") from None
        if items and all(is_int(t) for t in items):
            return [int(t) for t in items], ()
        if items and all(isinstance(m, dict) for m in items):
            template, special = self.model.manifest.get("chat_template"), self._special_tokens()
            messages = check_messages(items)
            text = render_chat(messages, template, special)
            # a model's own template writes its BOS itself; the default relies on the tokenizer's
            ids = self.encode_chat(text, messages, lambda m: render_chat(m, template, special), not template)
            return ids, (() if template else DEFAULT_STOP)
        raise EdgeRuntimeError("prompt must be a string, a list of token ids, or a list of chat messages")

    def _special_tokens(self) -> dict[str, str]:
        out = {}
        tok = self.tokenizer
        for key, tid in (("bos_token", self.config.bos_token_id),
                         ("eos_token", (self.config.eos_token_ids or (None,))[0])):
            if tok is not None and tid is not None:
                out[key] = tok.token_text(tid) or ""
        return out

    # ---- generation --------------------------------------------------------------------------------
    def stream_events(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                      stop: Sequence[str] = (), deadline_s: float | None = None,
                      should_stop: Callable[[], str | None] | None = None,
                      text_per_token: bool = True) -> Iterator[Piece | GenerationResult]:
        """Pieces, then the GenerationResult. Holds the runtime's lock from its first piece asked to its end
        (deadline_s counts from there; a deadline or should_stop that says stop before this call's turn comes
        gives a result with no token). text_per_token=False: the text comes whole at the end (generate_stream),
        for callers that want only the result."""
        if self._closed:
            raise EdgeRuntimeError("this runtime is closed")
        if isinstance(stop, str):  # one stop string, not its characters
            stop = (stop,)
        elif stop is None:  # OpenAI-style code passes None for "no stop strings"
            stop = ()
        elif isinstance(stop, (bytes, bytearray)) or not isinstance(stop, Iterable):  # b"." iterated as ints
            raise EdgeRuntimeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        ids, implied_stop = self.prepare_prompt(prompt)
        cfg = GenerationConfig(max_new_tokens, SamplingParams(temperature, top_k, top_p, repetition_penalty, seed),
                               tuple(stop) + implied_stop)
        if deadline_s is not None and finite("deadline_s", deadline_s) < 0:
            raise EdgeRuntimeError(f"deadline_s must be >= 0 seconds, got {deadline_s}")
        t_end = None if deadline_s is None else time.monotonic() + deadline_s
        if should_stop is not None and not callable(should_stop):
            raise EdgeRuntimeError(f"should_stop must be a function (returning a reason, True, or None to go on), got "
                                   f"{type(should_stop).__name__}; for a threading.Event pass its is_set")

        def stop_check() -> str | None:
            if self._closed:  # close() from this stream's own thread: end here, release when the stream ends
                return "cancelled"
            if t_end is not None and time.monotonic() >= t_end:
                return "deadline"
            if should_stop is None or not (reason := should_stop()):  # None, False, "": go on (event.is_set)
                return None
            return reason if isinstance(reason, str) else "cancelled"

        check_prompt(ids, self._live_decoder().max_context)  # before any wait: a bad prompt is refused, not late
        self._check_not_forked()  # before the lock, which a fork may have copied held
        with self._holding(stop_check if t_end is not None or should_stop else None) as (decoder, gave_up):
            if gave_up:  # the deadline passed, or should_stop said so, before this call's turn came
                self.last_result = GenerationResult("", [], len(ids), gave_up, 0.0, 0.0)
                yield self.last_result
                return
            for item in generate_stream(decoder, self.tokenizer, ids, cfg, stop_check, text_per_token):
                if isinstance(item, GenerationResult):
                    self.last_result = item
                elif self.token_listeners and item.new_token:
                    now = time.monotonic()
                    for listener in tuple(self.token_listeners):  # a listener may remove itself
                        listener(now)
                yield item
                self._owner = threading.get_ident()  # the thread that resumed the stream holds the lock now

    def generate(self, prompt: Prompt, **kwargs: Any) -> GenerationResult:
        """Blocking generation; keyword arguments as stream_events (max_new_tokens, temperature, top_k,
        top_p, repetition_penalty, seed, stop, deadline_s, should_stop)."""
        for item in self.stream_events(prompt, text_per_token=False, **kwargs):
            if isinstance(item, GenerationResult):
                return item
        raise AssertionError("generation ended without a result")

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """An iterator of text pieces as they are decoded."""
        for item in self.stream_events(prompt, **kwargs):
            if isinstance(item, Piece) and item.text:
                yield item.text

    async def agenerate(self, prompt: Prompt, **kwargs: Any) -> GenerationResult:
        """generate() in a worker thread. Cancelling the task (asyncio.wait_for's timeout, say) stops the generation
        at its next token: it used to run on to its end, and the next call waited for it."""
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(self.generate, prompt,
                                           should_stop=_or_cancelled(kwargs.pop("should_stop", None), cancelled),
                                           **kwargs)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def astream(self, prompt: Prompt, **kwargs: Any) -> AsyncIterator[str]:
        """Text pieces for asyncio; decoding runs in a worker thread. Leaving the loop early cancels."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()
        should_stop = _or_cancelled(kwargs.pop("should_stop", None), cancelled)

        def work() -> None:
            try:
                for piece in self.stream(prompt, should_stop=should_stop, **kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except Exception as e:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = loop.run_in_executor(None, work)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancelled.set()
            await worker

    # ---- lifetime ----------------------------------------------------------------------------------
    def _check_not_forked(self) -> None:
        if self.backend is not None and self.backend.name == "cpu":
            check_not_forked()

    def warm_up(self) -> None:
        """Run a two-token prefill and two decode steps in the decode mode in force, then forget them: compiled
        kernels are loaded (numba's cache; CUDA modules in the first step, the step's graph captured in the
        second) here rather than inside a caller's first deadline. No listener hears these tokens; statistics
        and position start from zero."""
        self._check_not_forked()
        with self._holding() as (decoder, _):
            bos = self.config.bos_token_id or 0
            prompt = min(2, decoder.max_context - 1)  # a context of 2 or 3 holds less (MIN_CONTEXT is 2)
            decoder.start([bos] * prompt, SamplingParams())
            for _ in range(min(2, decoder.max_context - prompt)):
                decoder.decode_step()
            decoder.reset()

    @contextmanager
    def _holding(self, stop_check: Callable[[], str | None] | None = None
                 ) -> Iterator[tuple[Decoder | None, str | None]]:
        """The lock for one generation or warm-up, and the decoder it may use: (decoder, None). With a stop_check
        (a deadline or should_stop), it is asked every LOCK_POLL_S while another thread's generation holds the
        lock and once more when the lock is taken, so the wait counts too: (None, its reason) when it says stop,
        the lock not held. The thread that already holds it (its stream suspended between two pieces) would wait
        for itself forever: refused."""
        me = threading.get_ident()
        if self._owner == me:
            raise EdgeRuntimeError("a stream from this runtime is still open on this thread; finish it or call "
                                   "its close() before starting another generation")
        if stop_check is None:
            self._lock.acquire()
        else:
            while not self._lock.acquire(timeout=LOCK_POLL_S):
                if self._closed:
                    raise EdgeRuntimeError("this runtime is closed")
                if (reason := stop_check()) is not None:
                    yield None, reason
                    return
            try:  # late when its turn came? (a should_stop that raises must not leave the lock held)
                reason = None if self._closed else stop_check()
            except BaseException:
                self._lock.release()
                raise
            if reason is not None:
                self._lock.release()
                yield None, reason
                return
        try:
            if self._closed:
                raise EdgeRuntimeError("this runtime is closed")
            self._owner = me
            try:
                yield self.decoder, None
            finally:
                self._owner = None
                if self._closed:  # close() came from this thread while the stream was open
                    self._release()
        finally:
            self._lock.release()

    def close(self) -> None:
        """Release the weights and the KV cache; later calls raise. From another thread, waits for the
        generation in progress; from the thread of a stream still open, ends that stream at its next token
        and releases when it ends (waiting here would never end)."""
        self.stop_watching()
        if self._owner == threading.get_ident():
            self._closed = True
            return
        with self._lock, self._configuring:  # a setting changed on another thread meets "closed", not a freed backend
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Under the lock: free the backend (host or device memory) and the model's arrays, drop the ONNX session,
        and close the token log a listener writes to. A closed runtime the application still refers to holds none
        of them (ten such held 168 MiB and 60 file mappings, a review measured)."""
        backend, self.backend, self.decoder, self.prefill = self.backend, None, None, None
        if backend is not None:
            backend.free()
        if self._holds_model:  # once: a second close() must not count this runtime out of the model twice
            self._holds_model = False
            self.model.release()
        if self._token_log is not None:
            with suppress(OSError):  # a last line its disk has no room for: the generation stands
                self._token_log.close()
            self._token_log = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def onnx_prefill(model: PackedModel, max_context: int):
    """The dense model exported to ONNX (cached beside it) in an ONNX Runtime session, for prompt prefill."""
    try:
        from edge_runtime.export.onnx_prefill import OnnxPrefill
    except ImportError:
        raise EdgeRuntimeError(f"--prefill onnx needs onnx and onnxruntime: {install_extra('onnx')}") from None
    return OnnxPrefill(model, max_context=max_context)


def _or_cancelled(should_stop: Callable[[], object] | None, cancelled: threading.Event) -> Callable[[], object]:
    """A should_stop that also says "cancelled" once the asyncio side has given up on the call."""
    if should_stop is not None and not callable(should_stop):
        return should_stop  # refused by stream_events, with its message
    return lambda: "cancelled" if cancelled.is_set() else (should_stop() if should_stop else None)


def load(path: str | Path | None = None, profile: str | None = "auto", backend: str = "auto",
         max_context: int | None = None, verify: bool = True, power_mode: str | None = None,
         objective: Objective | None = None, predictor: str = "auto", watch_power: bool = False,
         prefill: str = "native", threads: int | None = None, warm_up: bool = True) -> Runtime:
    """Open a packed model (the embedded default model when path is None).

    profile: "auto" detects the device, a name or YAML path picks one, None uses no profile. With a
    profile and a calibrated ReLU-family model, sparse decode starts with per-layer alphas chosen for
    the power mode (detected, or `power_mode`) and the objective (default: the profile's decode_target,
    e.g. hold the top mode's projected speed within +1 % held-out perplexity; sparsity/policy.py), with the
    predictor asked for ("auto": whichever calibrated one reads fewer bytes within the quality cap,
    chosen once). watch_power polls the board's nvpmodel state every second on a Jetson and re-selects
    on a change.

    With a profile, memory is planned before any weight is read (devices/planner.plan_load): the packed
    files plus the KV cache for max_context must fit the profile's usable memory and the memory free
    now; otherwise the KV cache is shortened with a KVBudgetWarning, or load refuses naming what fits.
    prefill "onnx" runs prompts through the ONNX export of the dense model in ONNX Runtime; decode stays on
    the backend. threads: the cpu backend's compute threads (None: the cores numpy's BLAS would use).
    warm_up runs Runtime.warm_up() before returning, so that the first request meets its deadline."""
    model_dir = resolve_model(path)
    check_max_context(max_context)
    prof = None
    if profile is not None:
        from edge_runtime.devices.detect import detect
        from edge_runtime.devices.profile import load_profile

        detected_mode = None
        if profile == "auto":
            found = detect()
            profile = found.profile
            if power_mode is None:
                power_mode = detected_mode = found.power_mode
        prof = load_profile(profile)
        if detected_mode is not None and not prof.has_mode(detected_mode):
            power_mode = None  # a custom or vendor nvpmodel mode: plan for the default, as the watcher would keep
            warnings.warn(PowerModeWarning(
                f"the board is in power mode {detected_mode!r}, which profile {prof.name} does not describe "
                f"(modes: {', '.join(m.name for m in prof.power_modes)}); selecting for its default mode "
                f"{prof.default_power_mode} until the board is in one of those"), stacklevel=2)
        prof.mode(power_mode)  # a mode the caller names that the profile lacks: refused before anything is read
    plan = None if prof is None else _plan_memory(model_dir, prof, max_context, backend, prefill)
    rt = Runtime(load_packed(model_dir, verify=verify), backend=backend,
                 max_context=plan.context if plan else max_context, prefill=prefill, threads=threads)
    rt.memory_plan = plan
    try:
        if prof is not None:
            rt.use_profile(prof, power_mode, objective, predictor)
            if watch_power and prof.kind == "jetson":
                from edge_runtime.devices.detect import mode_reader

                rt.watch_power_mode(mode_reader(prof))
        if warm_up:
            rt.warm_up()
    except BaseException:  # a NumericalError, say: the watcher and the backend's memory go with the runtime
        rt.close()
        raise
    return rt


def _size_on_disk(path: Path, default: int) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return default


def _plan_memory(model_dir: Path, profile: DeviceProfile, max_context: int | None, backend: str,
                 prefill: str = "native") -> LoadPlan:
    """The load plan from the manifest alone (nothing mapped yet): stored file bytes, the KV cache in the
    backend's dtype (the numpy backend keeps it in float32, the CUDA one in fp16 unless the weights are fp32),
    and what is built beside the weights: a small model's fp32 copies on the cpu backend, the fp32 ONNX
    Runtime session of prefill "onnx"."""
    from edge_runtime.backends import resolve_backend
    from edge_runtime.devices.planner import available_memory_gb, plan_load
    from edge_runtime.devices.sizes import cpu_f32_copy_bytes, model_bytes
    from edge_runtime.pack.format import load_manifest
    from edge_runtime.pack.loader import model_config

    manifest, _ = load_manifest(model_dir)  # validated: structure, types, paths inside the directory
    cfg = model_config(model_dir, manifest)
    # what will be mapped: the files on disk (the loader refuses any whose size differs from the manifest's)
    weights = sum(min(int(f["bytes"]), _size_on_disk(model_dir / name, int(f["bytes"])))
                  for name, f in manifest["files"].items())
    context = context_for(max_context, cfg.max_positions)  # warns here when past the model: Runtime gets it cut
    on_cpu = resolve_backend(backend) == "cpu"
    extras = {"fp32 copies for prompts": cpu_f32_copy_bytes(cfg, manifest["encoding"]) if on_cpu else 0,
              "the fp32 ONNX prefill session": model_bytes(cfg, "fp32")["total"] if prefill == "onnx" else 0}
    try:
        return plan_load(cfg, manifest["encoding"], weights, profile, context, available_memory_gb(),
                         kv_dtype_bytes=4 if on_cpu or manifest["encoding"] == "fp32" else 2,
                         extras={k: v for k, v in extras.items() if v})
    except EdgeRuntimeError as e:  # the manifest's errors name their files; a refusal to fit names the model
        raise type(e)(f"{e} ({model_dir})") from None
