"""llama-server's flags as the binary itself defines them: run `<binary> --help` and `--version`, parse
every spelling of every option, whether it takes a value and whether that value is a file. Plain Python
(no Django), so it can be tested against captured help text.

llama.cpp prints each option as `-ngl,  --gpu-layers, --n-gpu-layers N` padded to column 40 followed by
its help, or, when that head is too long, the head alone on its line and the help on the next lines
(indented by 40 spaces)."""

import difflib
import math
import re
import subprocess
from dataclasses import dataclass

HELP_COLUMN = 40
RUN_TIMEOUT = 15  # seconds for --help or --version; a real llama-server answers in milliseconds

# One spelling: `-c`, `--ctx-size`, `--fim-qwen-1.5b-default`.
SPELLING = re.compile(r"-{1,2}[A-Za-z0-9][A-Za-z0-9._-]*")
# `version: 6123 (abc1234)` or a packaged build's `version: 0.6.0-dev (build 0, commit unknown)`.
VERSION_LINE = re.compile(r"^version: (\S+) \(([^)]*)\)\s*$", re.MULTILINE)
# Metavar words that name a file or a folder: FNAME, FILE, PATH, JINJA_TEMPLATE_FILE, DIR, ...
FILE_WORDS = {"FNAME", "FILE", "FILENAME", "PATH", "DIR", "DIRECTORY"}
DIR_WORDS = {"DIR", "DIRECTORY"}
# Options whose value is a comma-separated list of proportions (`-ts 3,1`): finite ASCII numbers only, so that
# no NaN reaches llama-server, the estimator or a JSON answer.
NUMBER_LIST_FLAGS = {"--tensor-split"}
DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)


class FlagError(ValueError):
    """A cli_params entry the binary does not accept; the message is for people."""


class CatalogueError(Exception):
    """The binary could not be run or does not look like llama.cpp's llama-server."""


# --- running the binary -----------------------------------------------------------------------------


def run_binary(path: str, argument: str, env: dict[str, str] | None = None) -> str:
    """stdout and stderr of `<path> <argument>` (an argument list, no shell), or CatalogueError."""
    try:
        done = subprocess.run(
            [path, argument],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=RUN_TIMEOUT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CatalogueError(f"{path} {argument} did not finish within {RUN_TIMEOUT}s") from None
    except OSError as exc:
        raise CatalogueError(f"cannot run {path}: {exc.strerror or exc}") from None
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    if done.returncode != 0:
        raise CatalogueError(f"{path} {argument} exited with code {done.returncode}: {text.strip()[:200]}")
    return text


def parse_version(text: str) -> str:
    """ "b6123" for `version: 6123 (hash)`, the version word otherwise; CatalogueError when the output does
    not look like llama.cpp's."""
    match = VERSION_LINE.search(text)
    if not match:
        first = text.strip().splitlines()[0][:120] if text.strip() else "nothing"
        raise CatalogueError(f"--version printed {first!r}, not llama.cpp's 'version: N (commit)'")
    word = match.group(1)
    return f"b{word}" if word.isdigit() else word


def read_catalogue(path: str, env: dict[str, str] | None = None) -> dict:
    """The binary's version and flag catalogue, read from `--version` and `--help`."""
    version_text = run_binary(path, "--version", env)
    version = parse_version(version_text)
    options = parse_help(run_binary(path, "--help", env))
    spellings = {s for option in options for s in option["names"]}
    # A llama-server knows where its model comes from and where it listens.
    if not {"--model", "--port"} <= spellings:
        raise CatalogueError(f"{path} --help lists no --model/--port: not a llama-server")
    return {"version": version, "version_text": version_text.strip(), "options": options}


# --- parsing --help ---------------------------------------------------------------------------------


def _split_head(head: str) -> tuple[list[str], str]:
    """`-ngl,  --gpu-layers, --n-gpu-layers N` -> (["-ngl", "--gpu-layers", "--n-gpu-layers"], "N")."""
    names, rest = [], head.strip()
    while True:
        match = SPELLING.match(rest)
        if not match:
            break
        names.append(match.group(0))
        rest = rest[match.end() :]
        if rest.startswith(","):
            rest = rest[1:].lstrip()
            continue
        break
    return names, rest.strip()


def _file_kind(names: list[str], metavar: str, help_text: str) -> tuple[bool, bool]:
    """(the value is a path, it is a folder): from metavar words (FNAME, FILE, PATH, *_FILE, DIR) and
    long names ending in -file/-path/-dir."""
    words = {w.upper() for w in re.split(r"[^A-Za-z0-9]+", metavar) if w}
    longs = [n for n in names if n.startswith("--")]
    is_file = bool(words & FILE_WORDS) or any(n.endswith(("-file", "-path", "-dir")) for n in longs)
    is_dir = bool(words & DIR_WORDS) or any(n.endswith("-dir") for n in longs)
    if is_file and help_text.lower().startswith(("directory", "path to the directory")):
        is_dir = True
    return is_file and bool(metavar), is_dir and bool(metavar)


def parse_help(text: str) -> list[dict]:
    """Every option of llama-server's --help: its spellings, metavar, number of values, whether the value
    is a path (and a folder), its environment variable and help text."""
    options: list[dict] = []
    current: dict | None = None
    for line in text.splitlines():
        if line.startswith("-") and not line.startswith("-----"):
            if len(line) > HELP_COLUMN and line[HELP_COLUMN - 1] == " " and line[HELP_COLUMN] != " ":
                head, help_part = line[:HELP_COLUMN], line[HELP_COLUMN:]
            else:
                head, help_part = line, ""
            names, metavar = _split_head(head)
            if not names:
                current = None
                continue
            current = {"names": names, "metavar": metavar, "help": help_part.strip()}
            options.append(current)
        elif current is not None and line.startswith(" " * HELP_COLUMN):
            current["help"] = f"{current['help']} {line.strip()}".strip()
        elif not line.strip():
            continue
        else:
            current = None  # a section title or anything else ends the option
    for option in options:
        metavar, help_text = option["metavar"], option["help"]
        env = re.search(r"\(env: ([A-Z0-9_]+)\)", help_text)
        option["env"] = env.group(1) if env else ""
        # Two placeholders (`START END`) take two values; everything else one word (`N`, `<dev1,dev2,..>`,
        # `<tensor name pattern>=<buffer type>,...` is one value even with spaces inside the brackets).
        bare = re.sub(r"<[^>]*>|\[[^\]]*\]|\{[^}]*\}", "X", metavar)
        option["nargs"] = 0 if not metavar else len(bare.split())
        option["file"], option["directory"] = _file_kind(option["names"], metavar, help_text)
    return options


# --- resolving cli_params names -----------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    spelling: str  # exactly as the binary knows it: "-ngl", "--n-gpu-layers"
    option: dict  # the catalogue entry


class Catalogue:
    """Lookups over one binary's parsed options."""

    def __init__(self, data: dict, label: str = "llama-server"):
        self.version = data.get("version") or "unknown version"
        self.label = f"{label} {self.version}"
        self.options: list[dict] = data.get("options") or []
        self.by_spelling = {name: option for option in self.options for name in option["names"]}

    def resolve(self, name: str) -> Flag:
        """`ngl` -> `-ngl`, `c` -> `-c`, `n-gpu-layers` -> `--n-gpu-layers`; FlagError with a suggestion."""
        for spelling in (f"--{name}", f"-{name}") if len(name) > 1 else (f"-{name}", f"--{name}"):
            option = self.by_spelling.get(spelling)
            if option is not None:
                return Flag(spelling, option)
        known = sorted({s.lstrip("-") for s in self.by_spelling})
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise FlagError(f"{self.label} has no flag '{name}'{hint}")

    def value_words(self, name: str, flag: Flag, value) -> list[list[str]] | None:
        """The argument words each occurrence adds after the flag: [[]] for a bare flag, [["4096"]] for a
        value, one list per item of a list value; None when the flag is left out (False on a switch).
        FlagError when a value is missing or not wanted."""
        nargs = flag.option.get("nargs", 0)
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and nargs == 0:
            raise FlagError(f"{self.label}: flag '{name}' takes no value, so it cannot be repeated")
        words: list[list[str]] = []
        for item in items:
            if nargs == 0:
                if item is None or item is True:
                    words.append([])
                elif item is False:
                    continue
                else:
                    raise FlagError(
                        f"{self.label}: flag '{name}' takes no value (got {item!r}; use null for the bare flag)"
                    )
                continue
            if item is None or isinstance(item, bool):
                metavar = flag.option.get("metavar", "")
                got = "null" if item is None else str(item).lower()
                raise FlagError(
                    f"{self.label}: flag '{name}' needs a value ({metavar}), got {got}"
                    + (" (quote on/off/yes/no in YAML)" if isinstance(item, bool) else "")
                )
            if isinstance(item, float) and not math.isfinite(item):
                raise FlagError(f"{self.label}: flag '{name}' has the value {item}: not a finite number")
            if set(flag.option["names"]) & NUMBER_LIST_FLAGS:
                check_number_list(self.label, name, item)
            parts = str(item).split() if nargs > 1 else [str(item)]
            if len(parts) != nargs:
                raise FlagError(
                    f"{self.label}: flag '{name}' needs {nargs} values ({flag.option.get('metavar')}), "
                    f"given as one string separated by spaces"
                )
            words.append(parts)
        return words if words else None


def check_number_list(label: str, name: str, value) -> None:
    """`3,1` or `0.5/0.5`: finite ASCII numbers (FlagError otherwise: nan, inf, 1e999, full-width digits)."""
    items = [x.strip() for x in str(value).replace("/", ",").split(",")]
    bad = [x for x in items if not DECIMAL.fullmatch(x) or not math.isfinite(float(x))]
    if bad:
        raise FlagError(f"{label}: flag '{name}' needs finite numbers separated by commas, not {bad[0]!r}")
