"""Runs a replica's engine in a child process, the engine process, as vLLM V1 runs its
EngineCore: the model and its scheduler thread get a Python interpreter of their own.
The replica's process keeps Serve's event loop, Ray's threads, a frontend copy of the
engine (tokenizer only) for `prepare`, and the hand-over of outputs.

Why: in a replica, Ray's and Serve's Python threads (event loops, gRPC pollers, the
streaming of every request) hold the GIL, which the scheduler thread needs back after
each of the ~1000 torch ops of a forward pass. At 16 streamed clients on 2 cores a decode
forward pass took 120 ms in the replica against 91 ms in a plain process, the scheduler
thread waiting 26 ms of each.

The two processes talk over a socket pair (multiprocessing Connections, pickled tuples):

    replica -> engine: ("start", config, device)   ("add", key, fields)   ("cancel", key)   ("stop",)
    engine -> replica: ("ready", status, frontend_state) | ("load_failed", exception)
                       ("steps", key, deltas | exception | END, batch_started_at)
                       ("metric", name, args)   ("health", problem or None), every second

The engine process exits when the replica closes its end or dies (end of file).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from multiprocessing.connection import Connection

from deployments import metrics
from deployments.config import ModelConfig
from deployments.engine import END_OF_STEPS, Engine, PreparedRequest, import_engine_class, relay_steps
from deployments.protocol import EngineExitedError, GenerationParams, ModelStatus, SequenceDelta, TokenizeParams

logger = logging.getLogger("ray.serve")

# How often the engine process runs its engine's health check and reports it (a
# heartbeat as well: the replica counts it unhealthy once it has heard nothing for
# HEARTBEAT_DEADLINE_S, as from a frozen or stopped process).
HEALTH_CHECK_INTERVAL_S = 1.0
HEARTBEAT_DEADLINE_S = 15.0
# How long `close` waits for the engine process to exit before killing it.
EXIT_TIMEOUT_S = 10.0
_END = "end"  # a request's steps ended before every sequence finished (it was dropped)
# PreparedRequest fields that stay on their side: each side has its own event and clock.
_LOCAL_FIELDS = frozenset({"cancelled", "timings"})


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception may fail to pickle or to rebuild
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _Sender:
    """The one writer of a Connection: `send` queues the message and returns at once; a
    thread of its own writes them, in order.

    Why: a send blocks while the other side's socket buffer is full. When each side
    sent from the thread that also reads (the engine process's event loop; the
    replica's reader thread, cancelling), both could block in send with neither
    reading: a deadlock under large or many messages. Now no reader ever writes.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._failure: OSError | None = None
        self._writer = threading.Thread(target=self._write_forever, name="connection-writer", daemon=True)
        self._writer.start()

    def send(self, message: tuple) -> None:
        """Queues ``message``.

        Raises:
            OSError: an earlier write failed (the other side is gone).
        """
        if self._failure is not None:
            raise self._failure
        self._outbox.put(message)

    def flush(self, timeout_s: float) -> None:
        """Stops the writer after what is queued and waits up to ``timeout_s`` for it."""
        self._outbox.put(None)
        self._writer.join(timeout_s)

    def _write_forever(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._connection.send(message)
            except OSError as exc:  # the other side closed: later sends raise it
                self._failure = exc
                return


@dataclasses.dataclass
class _Stream:
    """A request being generated in the engine process, and the way to its caller."""

    request: PreparedRequest
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def put(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the caller's loop has closed: nobody is waiting
            pass


class EngineProcess(Engine):
    """The replica's side of an engine running in an engine process: it prepares requests
    with a frontend copy of the engine and relays their steps, metrics and health.

    The engine class is ``config.engine``; it must implement `frontend_state` and
    `load_frontend`. ``on_exit`` is called (on a helper thread, with the exit code) when
    the engine process ends without `close`; its requests fail and the health check
    fails either way.
    """

    def __init__(self, config: ModelConfig, device: str, on_exit: Callable[[int], None] | None = None) -> None:
        super().__init__(config, device)
        self._on_exit = on_exit
        self._frontend = import_engine_class(config.engine)(config, device)
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None
        self._sender: _Sender | None = None
        self._streams: dict[int, _Stream] = {}
        self._keys = itertools.count()
        self._status: ModelStatus | None = None
        self._problem: str | None = None  # why the engine cannot serve, as last reported
        self._heard_at = time.monotonic()  # when the engine process last sent anything
        self._closing = False

    def load(self) -> None:
        own_end, child_end = multiprocessing.Pipe()
        # The child imports what this replica imports (the engine class may live in the
        # app's working directory, which Ray put on sys.path).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "deployments.engine_process", str(child_end.fileno())],
            pass_fds=[child_end.fileno()],
            env=env,
        )
        child_end.close()
        self._connection, self._sender = own_end, _Sender(own_end)
        try:
            self._sender.send(("start", self.config, self.device))
            self._status, frontend_state = self._wait_until_loaded()
            self._heard_at = time.monotonic()
            self._frontend.load_frontend(frontend_state)
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._read_forever, name="engine-process-reader", daemon=True).start()
        logger.info("engine process %d serves %s", self._process.pid, self.config.name)

    def _wait_until_loaded(self) -> tuple[ModelStatus, object]:
        """The engine's status and frontend state once it has loaded; metrics it records
        meanwhile (its scheduler starts within load) are recorded on the way."""
        deadline = time.monotonic() + self.config.load_timeout_s
        while True:
            while not self._connection.poll(1.0):
                if self._process.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"model {self.config.name} did not load within load_timeout_s="
                        f"{self.config.load_timeout_s:g} s; the engine process was stopped"
                    )
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                code = self._process.wait()
                raise RuntimeError(
                    f"the engine process exited with code {code} while loading model "
                    f"{self.config.name}; its log is the replica's"
                ) from None
            if message[0] == "metric":
                metrics.record_by_name(message[1], message[2])
                continue
            if message[0] == "load_failed":
                raise message[1]
            _, status, frontend_state = message
            return status, frontend_state

    def status(self) -> ModelStatus:
        self.check_health()  # a broken engine is not ready
        return self._status

    def prepare(self, params: GenerationParams) -> PreparedRequest:
        return self._frontend.prepare(params)

    def tokenize(self, params: TokenizeParams) -> list[int]:
        return self._frontend.tokenize(params)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._frontend.detokenize(tokens)

    def tokenizer_info(self) -> dict:
        return self._frontend.tokenizer_info()

    async def generate(self, request: PreparedRequest) -> AsyncIterator[list[SequenceDelta]]:
        self._raise_if_exited()  # else nobody would ever answer this request
        key = next(self._keys)
        stream = _Stream(request, asyncio.get_running_loop(), asyncio.Queue())
        self._streams[key] = stream
        fields = {
            field.name: getattr(request, field.name)
            for field in dataclasses.fields(request)
            if field.name not in _LOCAL_FIELDS
        }
        ended = False
        try:
            self._send(("add", key, fields))
            async for deltas in relay_steps(stream.outputs, request.num_return_sequences):
                yield deltas
            ended = True  # every sequence finished, or the engine process dropped it
        finally:
            request.cancelled.set()
            if self._streams.pop(key, None) is not None and not ended:
                self._cancel(key)

    def check_health(self) -> None:
        if self._process is None:
            raise RuntimeError("model not loaded")
        self._raise_if_exited()
        if self._problem is not None:
            raise RuntimeError(self._problem)
        silent_s = time.monotonic() - self._heard_at
        if silent_s > HEARTBEAT_DEADLINE_S:
            raise RuntimeError(
                f"the engine process (pid {self._process.pid}) has sent nothing for {silent_s:.0f} s: "
                "frozen or stopped"
            )

    def _raise_if_exited(self) -> None:
        code = self._process.poll()
        if code is not None:
            raise EngineExitedError(code)

    def close(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._closing = True
        try:
            self._sender.send(("stop",))
            self._sender.flush(EXIT_TIMEOUT_S)
            self._process.wait(timeout=EXIT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()

    def _send(self, message: tuple) -> None:
        try:
            self._sender.send(message)
        except OSError as exc:
            raise RuntimeError(f"the engine process cannot be reached: {exc}") from exc

    def _cancel(self, key: int) -> None:
        try:
            self._sender.send(("cancel", key))
        except OSError:
            pass  # the engine process is gone, and the request with it

    def _read_forever(self) -> None:
        """Dispatches the engine process's messages (the reader thread)."""
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                break
            self._heard_at = time.monotonic()
            kind = message[0]
            if kind == "steps":
                _, key, item, batch_started_at = message
                stream = self._streams.get(key)
                if stream is None:
                    continue  # its caller has left
                if stream.request.cancelled.is_set():  # its caller gave up without leaving yet
                    self._streams.pop(key, None)
                    self._cancel(key)
                    continue
                if stream.request.timings.batch_started_at is None:
                    stream.request.timings.batch_started_at = batch_started_at
                stream.put(END_OF_STEPS if item == _END else item)
            elif kind == "metric":
                try:
                    metrics.record_by_name(message[1], message[2])
                except Exception:  # noqa: BLE001 - a metric must never stop the relay
                    logger.exception("could not record metric %s from the engine process", message[1])
            elif kind == "health":
                self._problem = message[1]
        code = self._process.wait()
        if not self._closing:
            logger.error("the engine process of %s exited with code %d", self.config.name, code)
            if self._on_exit is not None:
                # Before failing the streams: the replica's death is what the ingress
                # retries elsewhere, whereas an error that won the race to the caller
                # would reach its client as a 500.
                self._on_exit(code)
        failure = EngineExitedError(code)
        for stream in list(self._streams.values()):
            stream.put(failure)


# The engine process.


class _EngineHost:
    """Serves one loaded engine to the replica over ``connection``."""

    def __init__(self, engine: Engine, connection: Connection, sender: _Sender) -> None:
        self._engine, self._connection, self._sender = engine, connection, sender
        self._tasks: dict[int, asyncio.Task] = {}
        self._stopped: asyncio.Event | None = None

    async def serve(self) -> None:
        """Runs until the replica stops it or goes away."""
        self._stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(self._connection.fileno(), self._on_message)
        health = loop.create_task(self._report_health())
        await self._stopped.wait()
        health.cancel()

    def _on_message(self) -> None:
        try:
            message = self._connection.recv()
        except (EOFError, OSError):
            message = ("stop",)
        kind = message[0]
        if kind == "add":
            _, key, fields = message
            self._tasks[key] = asyncio.get_running_loop().create_task(self._run(key, PreparedRequest(**fields)))
        elif kind == "cancel":
            task = self._tasks.pop(message[1], None)
            if task is not None:
                task.cancel()  # the engine's generate then drops the request's rows
        elif kind == "stop":
            asyncio.get_running_loop().remove_reader(self._connection.fileno())
            self._stopped.set()

    async def _run(self, key: int, request: PreparedRequest) -> None:
        try:
            async for deltas in self._engine.generate(request):
                self._sender.send(("steps", key, deltas, request.timings.batch_started_at))
            self._sender.send(("steps", key, _END, request.timings.batch_started_at))
        except asyncio.CancelledError:
            pass  # the replica cancelled it
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine serves on
            self._sender.send(("steps", key, _portable(exc), request.timings.batch_started_at))
        finally:
            self._tasks.pop(key, None)

    async def _report_health(self) -> None:
        """Sends the engine's health every HEALTH_CHECK_INTERVAL_S, a change or not: it
        is the heartbeat too."""
        while True:
            try:
                self._engine.check_health()
                problem = None
            except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
                problem = str(exc) or type(exc).__name__
            self._sender.send(("health", problem))
            await asyncio.sleep(HEALTH_CHECK_INTERVAL_S)


def set_niceness(niceness: int) -> None:
    """Sets every thread of this process to ``niceness`` (Linux nice values are per thread;
    threads started later inherit their starter's). Without the right to lower it, keeps
    what the process has and says why."""
    inherited = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        for thread in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(thread), niceness)
    except PermissionError:  # at the first thread: they all share one niceness and one right
        logger.warning(
            "the engine process keeps niceness %d: lowering it to %d needs CAP_SYS_NICE or "
            "`ulimit -e %d`, so the decode loop competes with Serve's processes on equal terms",
            inherited, niceness, 20 - niceness,
        )


def _serve_engine(connection: Connection) -> None:
    _, config, device = connection.recv()
    set_niceness(config.engine_niceness)  # before load, so torch's threads inherit it
    sender = _Sender(connection)
    # Not a Ray worker: the replica records this process's metrics.
    metrics.record_elsewhere(lambda name, args: sender.send(("metric", name, args)))
    try:
        engine = import_engine_class(config.engine)(config, device)
        engine.load()
        ready = ("ready", engine.status(), engine.frontend_state())
    except Exception as exc:  # noqa: BLE001 - every load failure goes to the replica
        logger.exception("the engine process could not load model %s", config.name)
        sender.send(("load_failed", _portable(exc)))
        sender.flush(EXIT_TIMEOUT_S)
        return
    sender.send(ready)
    asyncio.run(_EngineHost(engine, connection, sender).serve())
    sender.flush(EXIT_TIMEOUT_S)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s engine-process %(process)d %(levelname)s %(message)s"
    )
    _serve_engine(Connection(int(sys.argv[1])))
    logging.shutdown()
    # The scheduler thread may be mid-step: leave without waiting for it.
    os._exit(0)
