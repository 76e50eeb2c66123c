"""pytest plugin (entry point `pytest11: certify`): options and hooks only; the work is in harness.session."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from .errors import SpecError
from .spec import SPECS_DIR, check_unique_names, known_model_names, load_spec, spec_path_for
from .tolerances import DTYPES

SESSION_KEY = pytest.StashKey["CertifySession"]()
SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("certify", "model certification (harness)")
    group.addoption("--model", action="append", default=[], metavar="NAME",
                    help="certify model_specs/NAME.yaml (repeatable, or a comma list)")
    group.addoption("--model-spec", action="append", default=[], metavar="PATH",
                    help="certify the spec at PATH (repeatable); its plugins resolve relative to it")
    group.addoption("--backend", action="append", default=[], metavar="NAME",
                    help="only check these backends (repeatable, or a comma list)")
    group.addoption("--dtype", action="append", default=[], metavar="DTYPE",
                    help="float32 or bfloat16 (default: every dtype the spec lists)")
    group.addoption("--device", default=None, metavar="cpu|cuda",
                    help="where the backends compute: cpu (gloo ranks) or cuda (NCCL, one GPU per rank); "
                         "env form CERTIFY_DEVICE; default: cuda where torch sees a GPU, else cpu. "
                         "CERTIFY_GPUS=N caps the GPUs a run may use")
    group.addoption("--executor", default=None, metavar="local|ray",
                    help="who starts the rank groups of Megatron (tp*pp) and DeepSpeed (world size): local "
                         "(torch.multiprocessing spawn, default) or ray (one actor per rank on a placement "
                         "group); env form CERTIFY_EXECUTOR; else the spec's executor section")
    group.addoption("--ray-address", default=None, metavar="ADDR",
                    help="with --executor ray: an existing Ray cluster (HEAD:6379); default: a local Ray "
                         "instance per worker; env form CERTIFY_RAY_ADDRESS")
    group.addoption("--report-dir", default="reports", metavar="DIR", help="where certificates go (default: reports/)")
    group.addoption("--list-models", action="store_true", help="list the models in model_specs/ and exit")


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _load_session(config: pytest.Config):
    from . import device as devices
    from .backends import ALL_BACKENDS
    from .session import CertifySession
    from .spec_plugins import validate_environment

    try:
        device = devices.select(config.option.device)
    except devices.DeviceError as exc:
        raise pytest.UsageError(str(exc)) from None
    names, paths = _split(config.option.model), _split(config.option.model_spec)
    backends, dtypes = _split(config.option.backend), _split(config.option.dtype)
    for backend in backends:
        if backend not in ALL_BACKENDS:
            raise SpecError("--backend", backend, f"unknown backend (known: {', '.join(ALL_BACKENDS)})")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise SpecError("--dtype", dtype, f"unknown dtype (known: {', '.join(DTYPES)})")
    specs = [load_spec(spec_path_for(name)) for name in names] + [load_spec(path) for path in paths]
    check_unique_names(specs)
    for spec in specs:
        validate_environment(spec)
    from .executor import ExecutorError

    try:
        return CertifySession(specs, backends, dtypes, config.option.report_dir, device,
                              config.option.executor, config.option.ray_address)
    except ExecutorError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_cmdline_main(config: pytest.Config):
    if config.option.list_models:
        for name in known_model_names():
            try:
                spec = load_spec(SPECS_DIR / f"{name}.yaml")
                print(f"{name:16} {spec.hf_model_type:16} {', '.join(spec.all_backends)}")
            except SpecError as exc:
                print(f"{name:16} INVALID: {exc.one_line()}")
        return 0
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "certify_suite(name): a conformance suite module run by the harness")
    if not (config.option.model or config.option.model_spec):
        return
    try:
        session = _load_session(config)
    except SpecError as exc:
        raise pytest.UsageError(exc.one_line()) from None
    config.stash[SESSION_KEY] = session
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [str(SUITES_DIR)]
        if not SUITES_DIR.is_relative_to(config.rootpath):
            # pytest guessed the rootdir from a --model-spec path outside the repo; node ids of the
            # suites would then read like "../../tmp/test_config.py". Root them at the repo instead.
            config._rootpath = SUITES_DIR.parent  # noqa: SLF001 - no public setter in pytest 9


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    suite = getattr(metafunc.module, "SUITE", None)
    if suite is None or "check" not in metafunc.fixturenames:
        return
    session = metafunc.config.stash.get(SESSION_KEY, None)
    checks = session.checks_for(suite) if session else []
    metafunc.parametrize("check", checks, ids=[c.id for c in checks])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A suite with no planned checks for the selection leaves no placeholder item behind."""
    from .plan import PlannedCheck

    empty = [item for item in items if getattr(getattr(item, "module", None), "SUITE", None)
             and not isinstance(getattr(getattr(item, "callspec", None), "params", {}).get("check"), PlannedCheck)]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [item for item in items if item not in empty]


@pytest.fixture(scope="session")
def certify(request: pytest.FixtureRequest):
    session = request.config.stash.get(SESSION_KEY, None)
    if session is None:
        pytest.skip("no model selected (use --model NAME or --model-spec PATH)")
    return session


@pytest.fixture(autouse=True)
def _certify_gate(request: pytest.FixtureRequest):
    """Checks whose backend cannot run here are recorded not_run with the reason before the body runs."""
    callspec = getattr(request.node, "callspec", None)
    check = callspec.params.get("check") if callspec else None
    session = request.config.stash.get(SESSION_KEY, None)
    if check is None or session is None:
        return
    from .verdict import Verdict

    if check.not_applicable:
        conclude(request, session, check, Verdict("not_applicable", check.not_applicable))
    reason = session.unavailable(check)
    if reason:
        conclude(request, session, check, Verdict("not_run", reason))


def conclude(request: pytest.FixtureRequest, session, check, verdict, seconds: float = 0.0) -> None:
    """Attach the certificate row to the test report (it survives xdist) and set the pytest outcome."""
    row = session.row(check, verdict, seconds)
    _allure_annotate(request, check, row)
    request.node.user_properties.append(("certify_row", json.dumps({"model": check.model, "row": row,
                                                                      "versions": session.versions},
                                                                     default=str)))
    if verdict.status == "passed":
        return
    if verdict.status in ("not_run", "not_applicable"):
        pytest.skip(f"{verdict.status.replace('_', ' ')}: {verdict.reason}")
    pytest.fail(f"{check.id} {verdict.status}: {verdict.reason}", pytrace=False)


def _allure_annotate(request: pytest.FixtureRequest, check, row: dict) -> None:
    """Group checks model > suite > backend in Allure and attach the row, when allure-pytest is recording."""
    if not request.config.getoption("--alluredir", default=None):
        return
    import allure

    allure.dynamic.parent_suite(check.model)
    allure.dynamic.suite(check.suite)
    allure.dynamic.sub_suite(check.backend)
    allure.dynamic.title(check.id)
    allure.dynamic.label("check_status", row["status"])
    allure.attach(json.dumps(row, indent=2, default=str), name="certificate row",
                  attachment_type=allure.attachment_type.JSON)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, value in report.user_properties:
        if key == "certify_row":
            session = _controller_session(report)
            if session is not None:
                data = json.loads(value)
                session.add_result(data["model"], data["row"], data["versions"])


_CONFIG: list[pytest.Config] = []


def _controller_session(report):
    return _CONFIG[0].stash.get(SESSION_KEY, None) if _CONFIG else None


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG[:] = [session.config]
    certify_session = session.config.stash.get(SESSION_KEY, None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    capture = session.config.pluginmanager.get_plugin("capturemanager")
    if certify_session is not None and reporter is not None and session.config.get_verbosity() >= 0:
        def progress(message: str) -> None:
            # progress is written from inside test bodies: step around pytest's output capture
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                reporter.ensure_newline()
                reporter.write_line(message, cyan=True)

        certify_session.progress = progress


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """An engine (vLLM, SGLang, lmdeploy) no later check of the model asks for is closed now, not at the end:
    at a real shape an idle engine per dtype holds its weights and KV cache beside the trainers that come after
    (the train suite runs last). Only where this process runs every item in order (not an xdist worker)."""
    certify_session = item.config.stash.get(SESSION_KEY, None)
    check = getattr(getattr(item, "callspec", None), "params", {}).get("check")
    if certify_session is None or check is None or hasattr(item.config, "workerinput") or item.session is None:
        return
    from .tolerances import ENGINES

    items = item.session.items
    later = items[items.index(item) + 1:] if item in items else []
    wanted = {(c.model, c.backend) for c in (getattr(getattr(i, "callspec", None), "params", {}).get("check")
                                              for i in later) if c is not None}
    for engine in ENGINES:
        if (check.model, engine) not in wanted:
            certify_session.close_engine(check.model, engine)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    certify_session = session.config.stash.get(SESSION_KEY, None)
    if certify_session is None:
        return
    certify_session.close()
    if hasattr(session.config, "workerinput"):
        return  # xdist worker: the controller writes the certificates
    certify_session.written = certify_session.write_certificates()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    certify_session = config.stash.get(SESSION_KEY, None)
    written = getattr(certify_session, "written", None)
    if not written:
        return
    terminalreporter.section("certification")
    for name, (folder, cert) in written.items():
        _model_summary(terminalreporter, certify_session, name, folder, cert)


def _model_summary(tr, certify_session, name: str, folder, cert: dict) -> None:
    """One screen per model: verdict, suite x status counts, worker times, where the reports are."""
    colour = {"certified": {"green": True}, "failed": {"red": True}, "incomplete": {"yellow": True}}
    from .device import describe

    tr.write_line(f"{name}: {cert['verdict'].upper()}", bold=True, **colour.get(cert["verdict"], {}))
    tr.write_line(f"  device: {describe(cert.get('device'))}")
    table: dict[tuple[str, str], dict[str, int]] = {}
    for check in cert["checks"]:
        cell = table.setdefault((check["suite"], check["backend"]), {})
        cell[check["status"]] = cell.get(check["status"], 0) + 1
    for (suite, backend), cell in sorted(table.items()):
        counts = ", ".join(f"{n} {s}" for s, n in sorted(cell.items()))
        tr.write_line(f"  {suite:10} {backend:10} {counts}")
    for (model, backend), times in sorted(certify_session.worker_times.items()):
        if model == name:
            tr.write_line(f"  worker {backend:10} start {times['start_s']:.1f}s, {times['calls']:.0f} calls, "
                          f"{times['busy_s']:.1f}s busy")
    failed = [c for c in cert["checks"] if c["status"] in ("failed", "error")]
    for check in failed[:10]:
        tr.write_line(f"  ✗ {check['id']}: {check['reason'].splitlines()[0][:160]}", red=True)
    tr.write_line(f"  reports: {folder}/index.html, certificate.json, summary.md")
