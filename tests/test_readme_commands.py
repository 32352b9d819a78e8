"""Every command the README shows, run where its quick start puts them: a clone of this
repository with a fresh virtual environment made by the quick start's own line (the
``workflow`` extra only, no test extras), on a tiny grid; and the report that
``snakemake --report report.html`` writes, opened in a real browser (headless Chromium).

The commands are read from README.md when the tests run, so a command changed there is
the command tested here."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.workflow_helpers import REPO, tiny_config

pytestmark = pytest.mark.slow

README = (REPO / "README.md").read_text()
EXP = Path("results/tiny")  # tiny_config's experiment
# two cells: the comparison's baseline (sam) and candidate (zsharp)
TINY = tiny_config(
    optimizers={
        "sam": {"opt_args": {"rho": 0.05}},
        "zsharp": {"opt_args": {"rho": 0.05, "percentile": 95.0}},
    }
)


def section(heading: str) -> str:
    """The README's text under ``heading`` (e.g. ``"## Quick start"``), up to the next
    heading of the same or a higher level (``#`` lines inside code blocks are comments)."""
    level = len(heading.split()[0])
    lines, inside, fenced = [], False, False
    for line in README.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            if inside and len(line.split()[0]) <= level:
                break
            inside = inside or line.strip() == heading
            continue
        if inside:
            lines.append(line)
    assert lines, f"README.md has no section {heading!r}"
    return "\n".join(lines)


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks in ``text``: comments dropped, continued lines
    joined, one command per entry."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if command:
                commands.append(command)
    return commands


QUICK_START = shell_commands(section("## Quick start"))
# "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[workflow]' && snakemake …"
QUICK_START_LINE = next(c for c in QUICK_START if "'.[workflow]'" in c)
BY_HAND = next(c for c in QUICK_START if c.startswith("zsharp train "))
WORKFLOW_COMMANDS = list(
    dict.fromkeys(  # each once: the GPU box repeats the paper's grid
        command
        for heading in ("## The workflow", "### A GPU box", "### SLURM")
        for command in shell_commands(section(heading))
        if command.startswith("snakemake ")
    )
)
REPORT_COMMAND = next(c for c in WORKFLOW_COMMANDS if "--report" in c)


def clean_environment() -> dict[str, str]:
    """This process's environment without its virtual environment (and with W&B off), as a
    user's shell on a fresh machine would have it."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP")
        and not key.startswith(("WANDB_", "ZSHARP_", "SNAKEMAKE_"))
    }
    ours = {str(Path(sys.prefix) / "bin"), str(Path(sys.executable).parent)}
    if sys.prefix == sys.base_prefix:
        ours = set()
    env["PATH"] = os.pathsep.join(
        entry for entry in env.get("PATH", "").split(os.pathsep) if entry and entry not in ours
    )
    # the config says wandb disabled; the by-hand run reads the environment (offline by default)
    env["WANDB_MODE"] = "disabled"
    return env


def copy_repository(target: Path) -> None:
    """The files of this checkout that a clone has (tracked ones and new, unignored ones)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def ci_torch_pair() -> str | None:
    """The PyTorch pair .ci/run installs before the project ("torch==… torchvision==…")."""
    match = re.search(
        r"pip install[^\n]*?(torch==\S+ torchvision==\S+)", (REPO / ".ci/run").read_text()
    )
    return match.group(1) if match else None


@dataclass
class Clone:
    path: Path
    env: dict[str, str]
    grid_output: str

    def run(
        self, command: str, cwd: Path | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """``command`` through bash in the quick start's environment (its .venv active)."""
        return subprocess.run(
            ["bash", "-c", command],
            cwd=cwd or self.path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def checked(result: subprocess.CompletedProcess[str]) -> str:
    """The output of a command that must have succeeded."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"`{result.args[-1]}` exited {result.returncode}:\n{output[-6000:]}"
    )
    return output


@pytest.fixture(scope="session")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Clone:
    """A clone whose config/config.yaml is the tiny grid, after the README's quick-start
    line ran in it: ``python3 -m venv .venv && … && snakemake --cores all``."""
    path = tmp_path_factory.mktemp("clone")
    copy_repository(path)
    (path / "config/config.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    env = clean_environment()

    def bash(command: str, timeout: float) -> str:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return checked(result)

    started = time.monotonic()
    # What .ci/run does first (and what a user with their own PyTorch build has): the torch
    # pair lying on this machine's disk, so pip does not fetch another from the registry.
    steps = QUICK_START_LINE.split("&&")
    assert steps[0].strip() == "python3 -m venv .venv", QUICK_START_LINE
    bash(steps[0], timeout=300)
    if pair := ci_torch_pair():
        bash(f".venv/bin/pip install --quiet {pair}", timeout=1200)
    torch_done = time.monotonic()
    # The README's line as it is: the venv again (a no-op), the project, the grid.
    output = bash(QUICK_START_LINE, timeout=1800)
    finished = time.monotonic()
    print(
        f"\nquick start: torch {torch_done - started:.0f} s, "
        f"the README's line (install + grid) {finished - torch_done:.0f} s"
    )
    venv = path / ".venv"
    env = {**env, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
    return Clone(path, env, output)


@pytest.fixture(scope="session")
def report(clone: Clone) -> Path:
    """The README's ``snakemake --report report.html``, run in the clone after the grid."""
    output = checked(clone.run(REPORT_COMMAND))
    assert "Report created" in output, output
    return clone.path / REPORT_COMMAND.split()[-1]


def test_quick_start_runs_the_grid_with_the_workflow_extra_only(clone: Clone) -> None:
    steps = [step.strip() for step in QUICK_START_LINE.split("&&")]
    assert "'.[test]'" not in QUICK_START_LINE
    # the SLURM section's install is the quick start's
    installs = [c for c in shell_commands(section("### SLURM")) if c.startswith("pip ")]
    assert installs and all(c in steps for c in installs), installs
    assert "(100%) done" in clone.grid_output, clone.grid_output[-3000:]
    table = pd.read_csv(clone.path / EXP / "results.csv")
    assert list(table["optimizer"]) == ["sam", "zsharp"]
    assert (table["failed"] == 0).all() and table["final_test_acc_mean"].between(0, 1).all()
    for plot in ("final_accuracy", "accuracy_vs_sharpness", "curves_digits_resnet20"):
        assert (clone.path / EXP / "plots" / f"{plot}.png").stat().st_size > 1000
    # the environment is the workflow extra's alone: nothing the test extra brings
    probe = "import importlib.util as u; print([m for m in ('pytest', 'ruff') if u.find_spec(m)])"
    assert checked(clone.run(f"python -c {probe!r}")).strip() == "[]"
    # and `python` there is the clone's venv, with the clone's package
    where = checked(clone.run("python -c 'import zsharp, sys; print(sys.prefix, zsharp.__file__)'"))
    assert where.split() == [str(clone.path / ".venv"), str(clone.path / "zsharp/__init__.py")]


def test_report_command_builds_the_report(report: Path) -> None:
    html = report.read_text(errors="replace")
    for name in (
        "results.csv",
        "comparison.csv",
        "final_accuracy.png",
        "curves_digits_resnet20.png",
    ):
        assert name in html, name


@pytest.mark.parametrize("command", [c for c in WORKFLOW_COMMANDS if c != REPORT_COMMAND])
def test_workflow_command(clone: Clone, command: str) -> None:
    """Each `snakemake` command of the README's workflow, GPU-box and SLURM sections: on the
    quick-start (tiny) config as given; on the big grids as a dry run (``-n``)."""
    if "--configfile" in command:
        output = checked(clone.run(f"{command} -n", timeout=300))
        assert "This was a dry-run" in output, output[-3000:]
        counts = dict(
            line.split()[:2] for line in output.splitlines() if line.split()[:1] == ["train"]
        )
        assert int(counts["train"]) >= 60, output[-3000:]
    else:  # the quick-start config, already run: a finished grid reruns nothing
        output = checked(clone.run(command, timeout=300))
        assert "Nothing to be done" in output, output[-3000:]


def test_slurm_profile_dry_run_on_the_quick_start_config(clone: Clone) -> None:
    profile = (
        next(c for c in WORKFLOW_COMMANDS if "--profile" in c).split("--profile ")[1].split()[0]
    )
    output = checked(clone.run(f"snakemake --profile {profile} -n --forceall", timeout=300))
    assert "This was a dry-run" in output
    # the profile's executor plugin was loaded and its settings accepted
    assert re.search(r"train\s+2\b", output), output[-3000:]


@pytest.mark.parametrize("command", ["train", "evaluate", "aggregate"])
def test_cli_help(clone: Clone, command: str) -> None:
    assert f"zsharp {command}" in README
    output = checked(clone.run(f"zsharp {command} --help"))
    assert output.startswith(f"usage: zsharp {command}"), output
    if command == "train":  # "`zsharp train --help` lists every setting (the table below)"
        assert "`zsharp train --help` lists every setting" in " ".join(README.split())
        table = README.split("<!-- generated: settings -->")[1].split("<!-- end generated -->")[0]
        settings = re.findall(r"^\| `(\w+)` \|", table, re.M)
        named = {"opt_args": "--opt", "model_args": "--model-arg"}
        flags = [named.get(s, "--" + s.replace("_", "-")) for s in settings]
        missing = [f for f in flags if f"[{f} " not in output and f"[{f}]" not in output]
        assert len(settings) > 10 and not missing, missing


def test_schema_command_prints_the_schema_the_configs_follow(clone: Clone) -> None:
    assert "`zsharp schema`" in README
    schema = json.loads(checked(clone.run("zsharp schema")))
    assert {"datasets", "models", "optimizers", "seeds"} <= set(schema["properties"])
    for config in ("config/config.yaml", "config/paper.yaml", "config/sgd.yaml"):
        jsonschema.validate(yaml.safe_load((clone.path / config).read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**TINY, "seeds": "zero"}, schema)


def test_snakefile_command_runs_the_workflow_from_any_folder(clone: Clone, tmp_path: Path) -> None:
    command = re.search(r'`(snakemake -s "\$\(zsharp snakefile\)")`', README).group(1)
    assert checked(clone.run("zsharp snakefile")).strip() == str(clone.path / "Snakefile")
    output = checked(clone.run(f"{command} -n", cwd=tmp_path))  # the default (tiny) grid
    assert "This was a dry-run" in output and re.search(r"train\s+2\b", output), output[-3000:]


def test_training_by_hand(clone: Clone) -> None:
    """The README's one training run by hand, with one epoch instead of the default 15."""
    output = checked(clone.run(f"{BY_HAND} --epochs 1", timeout=600))
    out = clone.path / BY_HAND.split("--out ")[1].split()[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["optimizer"] == "zsharp" and summary["config"]["epochs"] == 1
    assert (out / "model.pt").exists() and "test_acc" in output


# --- the report in a real browser --------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1000",
    "--remote-debugging-pipe",  # the DevTools protocol over fds 3 and 4
]


def _above_nine(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium driven through the DevTools protocol over a pipe (stdlib only)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_read, self._write = os.pipe()
        self._read, from_write = os.pipe()
        # the child's ends go to fds 3 and 4; move them above 9 first so the redirections
        # cannot overwrite one with the other
        to_read, from_write = _above_nine(to_read), _above_nine(from_write)
        self.process = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" "$@" 3<&{to_read} 4>&{from_write} {to_read}<&- {from_write}>&-',
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            pass_fds=(to_read, from_write),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_read)
        os.close(from_write)
        self._buffer = b""
        self._id = 0
        self._session: str | None = None
        self.events: list[dict[str, Any]] = []

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                stderr = self.process.stderr.read().decode(errors="replace")
                raise RuntimeError(f"Chromium exited:\n{stderr[-3000:]}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self._session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") != self._id:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply["result"]

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self.events.append(self._message(deadline))

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.send("Page.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=1600,
            height=1000,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str, context: int | None = None) -> Any:
        params: dict[str, Any] = {
            "expression": expression,
            "awaitPromise": True,
            "returnByValue": True,
        }
        if context is not None:
            params["contextId"] = context
        result = self.send("Runtime.evaluate", **params)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details)
        return result["result"].get("value")

    def frame_tables(self) -> list[list[list[str]]]:
        """The tables rendered inside the page's frames (an HTML result shows in an iframe)."""
        tables = []
        frames = self.send("Page.getFrameTree")["frameTree"].get("childFrames", [])
        while frames:
            frame = frames.pop()
            frames += frame.get("childFrames", [])
            context = self.send(
                "Page.createIsolatedWorld", frameId=frame["frame"]["id"], worldName="readme"
            )["executionContextId"]
            tables += self.js(f"({TABLES_JS})(document)", context=context)
        return tables

    def screenshot(self, clip: dict[str, float] | None = None) -> Image.Image:
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.process.wait(timeout=20)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)
        self.process.stderr.close()


TABLES_JS = """(root) => [...root.querySelectorAll('table')]
    .filter((t) => !t.closest('#app nav') && t.getClientRects().length)
    .map((t) => [...t.rows].map((r) => [...r.cells].map((c) => c.innerText.trim())))"""

# Helpers that drive the report's own menu by clicking what a reader clicks.
REPORT_JS = (
    """
window.__readme = (() => {
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  const until = async (test, what) => {
    for (let i = 0; i < 300; i++) {
      const value = test();
      if (value) return value;
      await sleep(50);
    }
    throw new Error('timed out waiting for ' + what);
  };
  const nav = () => document.querySelector('#app nav');
  const content = () => document.querySelector('#app > div').lastElementChild;
  const link = (text) => [...nav().querySelectorAll('a')].find((a) => a.innerText.trim() === text);
  const rows = () => [...nav().querySelectorAll('table tbody tr')];
  const tables = """
    + TABLES_JS
    + """;
  return {
    ready: () => until(() => nav() && link('Workflow'), 'the report menu').then(() => true),
    landing: () => ({tables: tables(content())}),
    async category(name) {
      nav().querySelector('nav ol li a').click();  // home
      (await until(() => link(name), 'the menu entry ' + name)).click();
      await until(() => rows().length, 'the results of ' + name);
      return rows().map((row) => ({
        labels: [...row.cells].slice(0, -1).map((c) => c.innerText.trim()),
        download: row.querySelector('a[type=button]').getAttribute('download'),
        href: row.querySelector('a[type=button]').getAttribute('href').slice(0, 64),
      }));
    },
    async show(index) {
      const before = (content().querySelector('img, iframe') || {}).src;
      rows()[index].querySelector('a[type=button]').click();
      const shown = await until(() => {
        const item = content().querySelector('img, iframe');
        if (!item || item.src === before) return null;
        return item.tagName === 'IFRAME' || (item.complete && item.naturalWidth) ? item : null;
      }, 'the result to show');
      if (shown.tagName === 'IFRAME') {
        await sleep(500);
        return {kind: 'iframe', src: shown.src.slice(0, 64)};
      }
      await shown.decode();
      const box = shown.getBoundingClientRect();
      return {kind: 'img', src: shown.src, width: shown.naturalWidth,
              height: shown.naturalHeight,
              box: {x: box.x, y: box.y, width: box.width, height: box.height}};
    },
  };
})();
true
"""
)


def data_uri_bytes(uri: str) -> tuple[str, bytes]:
    """(the file name, the bytes) of a Snakemake report data URI."""
    header, payload = uri.split(",", 1)
    name = re.search(r"filename=([^;]+)", header).group(1)
    return name, base64.b64decode(payload)


def on_white(image: Image.Image) -> Image.Image:
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, "white")
    return Image.alpha_composite(white, image).convert("RGB")


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    pixels = zip(a.getdata(), b.getdata(), strict=True)
    return sum(abs(x - y) for p, q in pixels for x, y in zip(p, q, strict=True)) / (
        3 * a.size[0] * a.size[1]
    )


def shows_results(tables: list[list[list[str]]], results: pd.DataFrame) -> bool:
    """Whether one table has a row per cell naming its dataset, model and optimizer and
    holding its final test accuracy (as a fraction or in %)."""

    def numbers(cells: list[str]) -> list[float]:
        return [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", " ".join(cells))]

    def has_row(table: list[list[str]], cell: pd.Series) -> bool:
        accuracy = cell["final_test_acc_mean"]
        return any(
            {cell["dataset"], cell["model"], cell["optimizer"]} <= set(row)
            and any(
                abs(n - accuracy) < 5e-4 or abs(n - 100 * accuracy) < 0.05 for n in numbers(row)
            )
            for row in table
        )

    return any(all(has_row(table, cell) for _, cell in results.iterrows()) for table in tables)


def chromium() -> str | None:
    return next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )


def test_report_in_a_browser_shows_the_results_table_and_the_plots(
    report: Path, clone: Clone, tmp_path: Path
) -> None:
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium to open the report in (bash .ci/chromium.sh installs Debian's)")
    results = pd.read_csv(clone.path / EXP / "results.csv")
    plots = {p.name: p for p in (clone.path / EXP / "plots").glob("*.png")}
    browser = Browser(binary, tmp_path / "profile")
    try:
        browser.open(report.as_uri())
        browser.js(REPORT_JS)
        browser.js("__readme.ready()")
        landing = browser.js("__readme.landing()")
        browser.screenshot().save(tmp_path / "landing.png")
        tables = list(landing["tables"])
        shown: dict[str, dict[str, Any]] = {}
        categories = browser.js("Object.keys(categories)")
        assert {"Results", "Plots", "Curves"} <= set(categories), categories
        for category in categories:
            for index, row in enumerate(browser.js(f"__readme.category({json.dumps(category)})")):
                if row["download"]:  # a CSV: the report offers it as a download link
                    assert row["href"].startswith("data:"), row
                    continue
                result = browser.js(f"__readme.show({index})")
                if result["kind"] == "iframe":
                    tables += browser.frame_tables()
                    continue
                name, data = data_uri_bytes(result["src"])
                image = browser.screenshot(result["box"])
                image.save(tmp_path / f"shown-{name}")
                shown[name] = {**result, "data": data, "screenshot": image}
    finally:
        browser.close()

    assert shows_results(tables, results), (
        f"no table in the report's page holds the results of {EXP}/results.csv "
        f"(screenshot: {tmp_path / 'landing.png'}); tables seen: {tables}"
    )
    assert set(shown) == set(plots), (set(shown), set(plots))
    for name, result in shown.items():
        original = Image.open(plots[name])
        assert result["data"] == plots[name].read_bytes(), name
        assert (result["width"], result["height"]) == original.size, name
        # the pixels on the screen are the plot's (any scaling the page applies undone)
        expected = on_white(original).resize(result["screenshot"].size)
        difference = mean_difference(result["screenshot"], expected)
        assert difference < 8, f"{name}: the screen differs from the plot by {difference:.1f}/255"
        assert len(set(result["screenshot"].getdata())) > 50, f"{name} looks blank on screen"
