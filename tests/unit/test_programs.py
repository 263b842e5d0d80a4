"""scripts/programs.txt is the one list of the programs engine, its tests,
benchmarks, demo and scripts run; scripts/setup.sh installs them from it.

These tests keep that list true: a scan of the code finds every program it
runs, and each must be on the list (else setup.sh would not install it and a
fresh machine would fail where this one happens to have it); each listed one
must be run somewhere (no stale entries) and be installed here.

The scan reads Python with `ast` and shell with shfmt's parser (--to-json):
  - argv lists starting with a literal (or a name bound to one) handed to
    subprocess.*, os.system/exec*, or a lab's run/popen;
  - `ip netns exec NS PROG ...`, `sh -c STRING`, `python -c CODE` and
    wrappers such as `timeout`, `env` or `command -v`, followed through;
  - shell strings (os.system, shell=True, a lab's run/popen with a str);
  - shutil.which("prog"), also over a loop of literals;
  - Python code handed to `python -c` (or a lab's python()), scanned too;
  - every command of the shell scripts in scripts/.
"""
import ast
import glob
import json
import os
import re
import shutil
import subprocess
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRAMS_TXT = os.path.join(ROOT, "scripts", "programs.txt")
SCANNED_DIRS = ("engine", "tests", "bench", "scripts")
# setup.sh's PATH (and sudo's secure_path): where the listed programs are looked up
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

RUNNERS = {"run", "Popen", "popen", "call", "check_call", "check_output", "system",
           "execv", "execve", "execvp", "execvpe", "execl", "execlp", "spawnv", "spawnvp"}
SHELL_RUNNERS = {"system"}            # take a shell string
# run(ns, "str") / popen(ns, "str") of engine's lab run the string with `sh -c`
LAB_RUNNERS = {"run", "popen"}
# commands that run the next argument as a program
WRAPPERS = {"exec", "command", "sudo", "env", "nohup", "timeout", "nice", "xargs", "setsid", "stdbuf"}
SHELL_BUILTINS = {
    "cd", "echo", "printf", "set", "export", "local", "read", "return", "exit", "source", ".",
    "test", "[", "true", "false", "shift", "trap", "wait", "eval", "declare", "readonly", "unset",
    "type", "hash", "getopts", "mapfile", "readarray", "kill", "ulimit", "umask", "pwd", "let",
    "break", "continue", ":", "alias", "shopt", "builtin", "typeset", "pushd", "popd", "dirs",
    "compgen", "complete", "caller", "disown", "enable", "jobs", "times",
}
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def read_lines(path=PROGRAMS_TXT):
    """[(program, debian package or '-', where or None)] from programs.txt."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            assert len(fields) == 2 and fields[1] != "-" or len(fields) == 3 and fields[1] == "-", \
                f"{path}:{n}: want 'program package' or 'program - where', got {line!r}"
            out.append((fields + [None])[:3])
    return out


def read_programs(path=PROGRAMS_TXT):
    """{program: debian package} from programs.txt."""
    return {prog: pkg for prog, pkg, _ in read_lines(path)}


# ---- shell ------------------------------------------------------------------

def _word_literal(word):
    """The text of a shell word that is all literal (quoted or not), else None."""
    text = []
    for part in word.get("Parts", []):
        if part["Type"] == "Lit":
            text.append(part.get("Value", ""))
        elif part["Type"] == "SglQuoted":
            text.append(part.get("Value", ""))
        elif part["Type"] == "DblQuoted" and all(p["Type"] == "Lit" for p in part.get("Parts", [])):
            text.extend(p.get("Value", "") for p in part.get("Parts", []))
        else:
            return None
    return "".join(text)


def _walk_json(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk_json(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_json(v)


def shell_programs(script, where):
    """[(program, where)] that a shell script or `sh -c` string runs."""
    r = subprocess.run(["shfmt", "--to-json"], input=script, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{where}: shfmt cannot parse it: {r.stderr.strip()}")
    tree = json.loads(r.stdout)
    functions = {n["Name"]["Value"] for n in _walk_json(tree) if n.get("Type") == "FuncDecl"}
    found = []
    for node in _walk_json(tree):
        if node.get("Type") != "CallExpr" or not node.get("Args"):
            continue
        words = [_word_literal(w) for w in node["Args"]]
        line = node["Pos"]["Line"]
        found += expand(argv_programs(words, shell=True), f"{where}:{line}", functions)
    return found


def expand(progs, where, functions=()):
    """[(program, where)] of argv_programs' answer, its `sh -c` scripts and
    `python -c` code scanned too."""
    out = []
    for p in progs:
        if isinstance(p, tuple):
            kind, text = p
            out += shell_programs(text, where) if kind == "sh" else python_code_programs(text, where)
        elif p not in functions:
            out.append((p, where))
    return out


def python_code_programs(code, where):
    """Python code held in a string (a `python -c` snippet)."""
    code = textwrap.dedent(re.sub(r"%\(\w+\)[rsd]|%[rsd]", "0", code))   # %-format holes
    try:
        return PythonScan(code, where + "(code)").scan()
    except SyntaxError:
        return []


# ---- argv -------------------------------------------------------------------

def argv_programs(words, shell=False):
    """Programs an argv runs; words are literal strings or None (unknown)."""
    out = []
    while words:
        if words[0] is None:
            # sys.executable -c CODE (an unknown program with -c: try it as Python)
            if len(words) > 2 and words[1] == "-c" and words[2] is not None:
                out.append(("python", words[2]))
            return out
        prog = os.path.basename(words[0])
        if not NAME.match(prog):
            return out
        if shell and prog in SHELL_BUILTINS:
            return out
        if prog in WRAPPERS:
            # skip the wrapper's options (and timeout's duration, env's X=Y)
            rest = words[1:]
            while rest and rest[0] is not None and (rest[0].startswith("-") or "=" in rest[0]
                                                      or (prog == "timeout" and rest[0][:1].isdigit())):
                rest = rest[1:]
            if prog == "command":   # `command -v X` looks X up to run it
                out += [os.path.basename(w) for w in rest if w is not None and NAME.match(os.path.basename(w))]
                return out
            if prog not in ("exec", "command"):   # builtins of the shell
                out.append(prog)
            words = rest
            continue
        out.append(prog)
        if prog == "ip" and words[1:3] == ["netns", "exec"]:
            words = words[4:]
            continue
        if prog in ("sh", "bash", "dash") and len(words) > 2 and words[1] == "-c":
            out.append(("sh", words[2]))
        elif prog.startswith("python") and len(words) > 2 and words[1] == "-c":
            out.append(("python", words[2]))
        return out
    return out


# ---- Python -----------------------------------------------------------------

def _call_name(func):
    if isinstance(func, ast.Attribute):
        return func.attr, func.value
    if isinstance(func, ast.Name):
        return func.id, None
    return None, None


class PythonScan:
    """The programs one Python source runs."""

    def __init__(self, source, where):
        self.where = where
        self.tree = ast.parse(source)
        self.bound = {}          # name -> [expr] it is assigned (module-wide, any scope)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        self.bound.setdefault(t.id, []).append(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                self.bound.setdefault(node.target.id, []).append(node.value)
            elif isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name) \
                    and isinstance(node.iter, (ast.Tuple, ast.List)):
                self.bound.setdefault(node.target.id, []).extend(node.iter.elts)
        self.found = []

    def strings(self, expr, depth=0):
        """The literal strings expr can be: constants, names bound to them,
        `shutil.which("x") or "/usr/sbin/x"`, f-strings with holes as 'X'."""
        if depth > 5 or expr is None:
            return []
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return [expr.value]
        if isinstance(expr, ast.Name):
            return [s for e in self.bound.get(expr.id, []) for s in self.strings(e, depth + 1)]
        if isinstance(expr, ast.BoolOp):
            return [s for v in expr.values for s in self.strings(v, depth + 1)]
        if isinstance(expr, ast.Call) and _call_name(expr.func)[0] in ("which", "dedent") and expr.args:
            return self.strings(expr.args[0], depth + 1)
        if isinstance(expr, ast.JoinedStr):
            return ["".join(v.value if isinstance(v, ast.Constant) else "X" for v in expr.values)]
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Mod):   # "..." % args
            return self.strings(expr.left, depth + 1)
        return []

    def lists(self, expr, depth=0):
        """The list/tuple literals expr can be (directly or through a name)."""
        if depth > 5:
            return []
        if isinstance(expr, (ast.List, ast.Tuple)):
            return [expr]
        if isinstance(expr, ast.Name):
            return [l for e in self.bound.get(expr.id, []) for l in self.lists(e, depth + 1)]
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):     # argv + [...]
            return self.lists(expr.left, depth + 1)
        return []

    def words(self, elts):
        out = []
        for e in elts:
            s = set(self.strings(e)) if not isinstance(e, ast.Starred) else set()
            if len({os.path.basename(x) for x in s}) == 1 < len(s):   # NGINX: which("nginx") or its path
                s = {os.path.basename(s.pop())}
            out.append(s.pop() if len(s) == 1 else None)
        return out

    def add_argv(self, words, line):
        self.found += expand(argv_programs(words), f"{self.where}:{line}")

    def scan(self):
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call):
                continue
            name, owner = _call_name(node.func)
            if name == "python" and len(node.args) > 1:      # lab.python(ns, CODE)
                for s in self.strings(node.args[1]):
                    self.found += python_code_programs(s, f"{self.where}:{node.lineno}")
            if name == "which" and node.args:
                for s in self.strings(node.args[0]):
                    if NAME.match(os.path.basename(s)):
                        self.found.append((os.path.basename(s), f"{self.where}:{node.lineno}"))
            if name not in RUNNERS:
                continue
            via_subprocess = isinstance(owner, ast.Name) and owner.id in ("subprocess", "os")
            shell = name in SHELL_RUNNERS or any(k.arg == "shell" and isinstance(k.value, ast.Constant)
                                                 and k.value.value for k in node.keywords)
            args = list(node.args) + [k.value for k in node.keywords if k.arg == "args"]
            for i, arg in enumerate(args):
                for lst in self.lists(arg):
                    self.add_argv(self.words(lst.elts), node.lineno)
                if isinstance(arg, ast.Name) and not self.bound.get(arg.id):
                    continue
                strs = [] if self.lists(arg) else self.strings(arg)
                for s in strs:
                    if shell or (not via_subprocess and name in LAB_RUNNERS and i == 1):
                        self.found += shell_programs(s, f"{self.where}:{node.lineno}")
                    elif via_subprocess and i == 0:
                        self.add_argv([s], node.lineno)
        return self.found


def scan_file(path):
    where = os.path.relpath(path, ROOT)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # the interpreter of a #! line runs too (`#!/usr/bin/env bash`: env, bash)
    shebang = re.match(r"#!\s*(\S.*)", text)
    found = expand(argv_programs(shebang.group(1).split()), where + ":1") if shebang else []
    if path.endswith(".py"):
        return found + PythonScan(text, where).scan()
    if path.endswith(".sh") or (shebang and re.search(r"\b(ba|da)?sh\b", shebang.group(1))):
        return found + shell_programs(text, where)
    return found


def scan_tree(root=ROOT, dirs=SCANNED_DIRS):
    """{program: [where it runs]} over every .py and shell script in dirs."""
    found = {}
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, d)):
            dirnames[:] = [n for n in dirnames if n not in ("__pycache__", "corpus", "build")]
            for fn in sorted(filenames):
                if fn.endswith((".py", ".sh")) or (d == "scripts" and "." not in fn):
                    for prog, where in scan_file(os.path.join(dirpath, fn)):
                        found.setdefault(prog, []).append(where)
    return found


@pytest.fixture(scope="module")
def scanned():
    return scan_tree()


def test_every_program_the_code_runs_is_listed(scanned):
    listed = read_programs()
    missing = {p: w[:3] for p, w in scanned.items() if p not in listed}
    assert not missing, ("the code runs programs that scripts/programs.txt does not list "
                         f"(add 'program debian-package' lines): {missing}")


def test_every_listed_program_is_run_somewhere(scanned):
    unused = sorted(set(read_programs()) - set(scanned))
    assert not unused, f"scripts/programs.txt lists programs nothing runs: {unused}"


def test_every_listed_program_is_installed():
    # Never a skip: a missing program is a missing install step.
    path = os.environ.get("PATH", "") + os.pathsep + SYSTEM_PATH
    missing = {p: pkg for p, pkg, where in read_lines()
               if not (glob.glob(os.path.expanduser(where)) if where else shutil.which(p, path=path))}
    assert not missing, f"not installed (sudo bash scripts/setup.sh installs them): {missing}"


def test_setup_reads_the_list():
    with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
        assert "scripts/programs.txt" in f.read()


# ---- the scanner itself -----------------------------------------------------

SAMPLE_PY = '''
import os, shutil, subprocess, sys, textwrap
NGINX = shutil.which("nginxx") or "/usr/sbin/nginxx"
PROBE = textwrap.dedent("""
    import os
    os.system("sysctlx -qw a=1; ipx link set st0 up && catx /x | grepx y")
    sys.path.insert(0, %(root)r)
""")
def f(lab, ns, url):
    subprocess.run(["p-argv", "-x"])
    subprocess.run(["ip", "netns", "exec", ns, "p-in-netns", "-s"])
    subprocess.run("p-plain-str")
    subprocess.run(f"p-shell {url} | p-piped", shell=True)
    lab.run(ns, ["timeout", "5", "p-wrapped", "x"])
    lab.run(ns, "p-lab-shell -q && p-lab-shell2")
    lab.popen(ns, [NGINX, "-c", "conf"])
    lab.run(ns, ["sh", "-c", "p-sh-c 2>/dev/null; true"])
    lab.run(ns, [sys.executable, "-c", PROBE % {"root": "/"}])
    argv = ["p-bound", "-c", url]
    lab.run(ns, argv)
    for tool in ("p-which-loop", NGINX):
        shutil.which(tool)
    subprocess.run([sys.executable, "-m", "engine"])
    parametrize("name", ["not-a-program", "x"])
    fuzz.run(lib, 3, config="not-a-program-either")
'''

SAMPLE_SH = '''#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
helper() { p-in-func --x; }
while read -r a b; do command -v "$a" >/dev/null || p-loop-body; done < <(p-proc-subst)
if [ -n "$(p-cmd-subst)" ]; then helper; fi
"$VENV/bin/python" -m pip install x
X=1 p-after-assign | sudo p-sudo
exec p-exec "$@"
'''


def test_scanner_finds_each_pattern(tmp_path):
    found = {p for p, _ in PythonScan(SAMPLE_PY, "sample.py").scan()}
    assert found == {"nginxx", "sysctlx", "ipx", "catx", "grepx", "p-argv", "ip", "p-in-netns",
                     "p-plain-str", "p-shell", "p-piped", "timeout", "p-wrapped", "p-lab-shell",
                     "p-lab-shell2", "sh", "p-sh-c", "p-bound", "p-which-loop"}, found
    found = {p for p, _ in shell_programs(SAMPLE_SH, "sample.sh")}
    assert found == {"dirname", "p-in-func", "p-loop-body", "p-proc-subst", "p-cmd-subst",
                     "p-after-assign", "sudo", "p-sudo", "p-exec"}, found
