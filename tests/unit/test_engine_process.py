"""The engine process: a real child process running the real transformers engine (tiny
model) or the fake engine, driven through EngineProcess as a replica drives it."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from deployments import metrics
from deployments.config import ModelConfig
from deployments.engine_process import EngineProcess
from deployments.model_source import ModelSourceError
from deployments.protocol import EngineExitedError, GenerationParams, InvalidRequestError
from deployments.transformers_engine import TransformersEngine
from deployments.transformers_engine.loading import ModelLoadError
from tests.fakes import FAKE_ENGINE, FakeDecodeError, fake_source
from tests.processes import exited, stat_fields
from tests.tiny_model import TINY_CONTEXT_LENGTH
from tests.unit.test_transformers_engine import greedy, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(tiny_model_dir, **fields) -> ModelConfig:
    # float32 and every step handed over, as the in-process engine's tests, so the two
    # can be compared token for token.
    return ModelConfig(name="tiny", source=str(tiny_model_dir), dtype="float32", stream_interval_s=0, **fields)


@pytest.fixture(scope="module")
def engine_process(tiny_model_dir):
    engine = EngineProcess(tiny_config(tiny_model_dir), "cpu")
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def in_process(tiny_model_dir):
    engine = TransformersEngine(tiny_config(tiny_model_dir), "cpu")
    engine.load()
    return engine


def fake_engine(**source) -> EngineProcess:
    return EngineProcess(ModelConfig(name="fake", source=fake_source(**source), engine=FAKE_ENGINE), "cpu")


def test_the_model_runs_in_a_child_process_and_reports_its_status(engine_process):
    pid = engine_process._process.pid
    assert pid != os.getpid()
    assert os.getppid() != pid and open(f"/proc/{pid}/cmdline").read().split("\0")[:3] == [
        sys.executable, "-m", "deployments.engine_process",
    ]
    status = engine_process.status()
    assert (status.name, status.device, status.dtype) == ("tiny", "cpu", "float32")
    assert status.context_length == TINY_CONTEXT_LENGTH
    engine_process.check_health()


def test_generates_exactly_what_the_engine_generates_in_process(engine_process, in_process):
    requests = [
        greedy(max_new_tokens=9),
        greedy("A longer prompt about the sea and its ships", max_new_tokens=14, stop=("e",)),
        GenerationParams(prompt="Seeded", max_new_tokens=11, temperature=0.9, top_p=0.9, seed=7,
                         num_return_sequences=3),
    ]
    assert run(engine_process, *requests) == run(in_process, *requests)


def test_prepare_runs_in_the_replica_with_the_models_context(engine_process):
    with pytest.raises(InvalidRequestError) as error:
        engine_process.prepare(greedy(max_new_tokens=TINY_CONTEXT_LENGTH))
    assert error.value.param == "max_new_tokens" and str(TINY_CONTEXT_LENGTH) in str(error.value)


def test_request_timings_come_back_from_the_engine_process(engine_process):
    prepared = engine_process.prepare(greedy(max_new_tokens=3))

    async def consume():
        return [deltas async for deltas in engine_process.generate(prepared)]

    asyncio.run(consume())
    timings = prepared.timings
    assert timings.received_at <= timings.batch_started_at <= time.monotonic()


def test_batch_sizes_are_recorded_by_the_replica(engine_process, monkeypatch):
    observed = []
    monkeypatch.setattr(metrics, "record_batch_size", lambda model, rows: observed.append((model, rows)))
    run(engine_process, greedy(max_new_tokens=6), greedy("Two", max_new_tokens=6))
    time.sleep(0.2)  # the reader thread records what arrived with the last step
    assert observed and {model for model, _ in observed} == {"tiny"}
    assert max(rows for _, rows in observed) == 2


def test_a_caller_that_leaves_frees_the_engine(engine_process, monkeypatch):
    steps = []
    monkeypatch.setattr(metrics, "record_batch_size", lambda model, rows: steps.append(rows))
    prepared = engine_process.prepare(greedy(max_new_tokens=TINY_CONTEXT_LENGTH - 8))

    async def read_one_step_and_leave():
        stream = engine_process.generate(prepared)
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert asyncio.run(read_one_step_and_leave())[0].completion_tokens == 1
    time.sleep(1.0)
    after_leaving = len(steps)
    time.sleep(1.0)
    assert 1 <= after_leaving < 50
    assert len(steps) == after_leaving, "the engine process still decodes the abandoned request"
    assert run(engine_process, greedy(max_new_tokens=4))[0][0][1:] == ("length", 4)


def test_an_engine_error_fails_its_request_only():
    engine = fake_engine(failing=True)
    engine.load()
    try:
        failing, fine = GenerationParams(prompt="fail", max_new_tokens=5), GenerationParams(prompt="ok", max_new_tokens=5)
        with pytest.raises(FakeDecodeError, match="fake decode failure"):
            run(engine, failing, fine)
        assert run(engine, fine)[0][0][1:] == ("length", 5)
        engine.check_health()
    finally:
        engine.close()


def test_a_load_failure_is_raised_in_the_replica_and_leaves_no_process(tmp_path):
    engine = EngineProcess(ModelConfig(source=str(tmp_path / "no-such-model")), "cpu")
    with pytest.raises((ModelLoadError, ModelSourceError)) as error:
        engine.load()
    assert "no-such-model" in str(error.value)
    assert engine._process.poll() is not None


def test_a_broken_engine_never_becomes_ready():
    engine = fake_engine(broken=True)
    with pytest.raises(RuntimeError, match="engine broken"):
        engine.load()


def test_the_death_of_the_engine_process_fails_health_and_its_requests():
    engine = fake_engine(step_s=0.05)
    engine.load()
    engine.check_health()
    prepared = engine.prepare(GenerationParams(prompt="long", max_new_tokens=400))

    async def kill_midway():
        stream = engine.generate(prepared)
        await stream.__anext__()
        os.kill(engine._process.pid, signal.SIGKILL)
        async for _ in stream:
            pass

    with pytest.raises(RuntimeError, match="engine process exited with code -9"):
        asyncio.run(asyncio.wait_for(kill_midway(), timeout=10))
    with pytest.raises(RuntimeError, match="exited with code -9"):
        engine.check_health()
    with pytest.raises(RuntimeError, match="exited"):
        run(engine, GenerationParams(prompt="after", max_new_tokens=2))


def test_the_replica_hears_of_the_engine_process_death_before_its_requests_do():
    # The replica exits in `on_exit`, so that the ingress retries what it held; a stream
    # failed first could hand its error to the caller (a 500) before the replica is gone.
    events = []
    engine = EngineProcess(
        ModelConfig(name="fake", source=fake_source(step_s=0.05), engine=FAKE_ENGINE), "cpu",
        on_exit=lambda code: events.append(("exit", code)),
    )
    engine.load()
    try:
        prepared = engine.prepare(GenerationParams(prompt="long", max_new_tokens=400))

        async def kill_midway():
            generation = engine.generate(prepared)
            await generation.__anext__()
            (stream,) = engine._streams.values()
            put = stream.put
            stream.put = lambda item: (isinstance(item, Exception) and events.append(("failure", str(item))), put(item))
            os.kill(engine._process.pid, signal.SIGKILL)
            async for _ in generation:
                pass

        with pytest.raises(EngineExitedError, match="exited with code -9"):
            asyncio.run(asyncio.wait_for(kill_midway(), timeout=10))
        assert events == [("exit", -9), ("failure", "the engine process exited with code -9")]
        with pytest.raises(EngineExitedError):  # a request arriving meanwhile: a replica failure
            run(engine, GenerationParams(prompt="after", max_new_tokens=2))
    finally:
        engine.close()


def test_an_engine_process_that_stops_answering_fails_health_until_it_answers_again(monkeypatch):
    """Frozen (here stopped with SIGSTOP), it sends no heartbeat: the replica's health
    check fails, so Serve replaces the replica, rather than trusting its last report."""
    from deployments import engine_process as module

    monkeypatch.setattr(module, "HEARTBEAT_DEADLINE_S", 2.0)
    engine = fake_engine()
    engine.load()

    def health_problem() -> str | None:
        try:
            engine.check_health()
        except RuntimeError as exc:
            return str(exc)
        return None

    def wait_for(condition, timeout_s: float = 20.0):
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "no change within 20 s"
            time.sleep(0.1)

    try:
        assert health_problem() is None
        os.kill(engine._process.pid, signal.SIGSTOP)
        wait_for(lambda: health_problem() is not None)
        assert "has sent nothing for" in health_problem() and "frozen or stopped" in health_problem()
        os.kill(engine._process.pid, signal.SIGCONT)
        wait_for(lambda: health_problem() is None)
    finally:
        os.kill(engine._process.pid, signal.SIGCONT)
        engine.close()


def test_close_stops_the_engine_process():
    engine = fake_engine()
    engine.load()
    engine.close()
    assert engine._process.poll() == 0


def test_the_engine_process_exits_when_its_replica_dies():
    """A replica killed outright (Ray's SIGKILL) must not leave its model behind."""
    replica = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from deployments.config import ModelConfig
            from deployments.engine_process import EngineProcess
            engine = EngineProcess(ModelConfig(source={fake_source()!r}, engine={FAKE_ENGINE!r}), "cpu")
            engine.load()
            print(engine._process.pid, flush=True)
            time.sleep(60)
        """)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        child = int(replica.stdout.readline())
        replica.kill()
        replica.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not exited(child):
            time.sleep(0.1)
        assert exited(child), "the engine process outlived its replica"
    finally:
        replica.kill()


def test_the_engine_process_runs_at_its_configured_niceness():
    engine = EngineProcess(
        ModelConfig(name="fake", source=fake_source(), engine=FAKE_ENGINE, engine_niceness=7), "cpu"
    )
    engine.load()
    try:
        tasks = f"/proc/{engine._process.pid}/task"
        nice = {int(stat_fields(f"{tasks}/{thread}/stat")[16]) for thread in os.listdir(tasks)}
        assert nice == {7}
    finally:
        engine.close()


def test_niceness_without_an_engine_process_is_refused():
    with pytest.raises(ValueError, match="engine_niceness applies to an engine process"):
        ModelConfig(engine_process=False, engine_niceness=5)
    assert ModelConfig(engine_process=False).engine_niceness == 0


def test_sending_never_blocks_on_a_reader_that_stalls():
    """Large messages to a side that is not reading: each send returns at once (a
    writer thread holds them), and they all arrive, in order, once it reads. A send
    that blocked here is how the replica and its engine process could deadlock, each
    stuck writing to the other."""
    import multiprocessing
    import threading

    from deployments.engine_process import _Sender

    ours, theirs = multiprocessing.Pipe()
    sender = _Sender(ours)
    payload = "x" * (1 << 20)  # far beyond a socket buffer
    sent = threading.Event()

    def send_all():
        for number in range(20):
            sender.send(("add", number, payload))
        sent.set()

    threading.Thread(target=send_all, daemon=True).start()
    assert sent.wait(5), "send blocked while nobody read"
    received = [theirs.recv() for _ in range(20)]
    assert [message[1] for message in received] == list(range(20))
    assert all(message[2] == payload for message in received)
    theirs.close()
    sender.send(("cancel", 1))  # queued; the write fails: the other side is gone
    sender.flush(5)
    with pytest.raises(OSError):
        sender.send(("cancel", 2))


def test_a_model_that_loads_too_long_is_stopped_with_a_clear_error():
    config = ModelConfig(name="slow", source=fake_source(load_s=30), engine=FAKE_ENGINE, load_timeout_s=1)
    engine = EngineProcess(config, "cpu")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not load within load_timeout_s=1 s"):
        engine.load()
    assert time.monotonic() - started < 15
    assert engine._process.poll() is not None, "the engine process is gone"
