"""deploy/Dockerfile builds, checked without a Docker engine: its build stage is replayed on
this machine (the same Debian packages), and its runtime stage's sources are looked for.

The one idea: do what `docker build -f deploy/Dockerfile .` would do with the files. The
context is the repository root filtered by .dockerignore; every COPY of the build stage
copies exactly that into a scratch root (honouring WORKDIR), the stage's RUN lines after its
first COPY (the ones that work on the sources; those before install packages, which this
machine has) run there, and then every runtime `COPY --from=build` source must exist in the
scratch root and every plain COPY source in the context. `docker-compose config` sees none
of this: a build stage that copies too little only fails in a real build."""

import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from clusterlib import REPO, clean_env

DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


# ---- the Dockerfile ----------------------------------------------------------------------


def parse_dockerfile(text):
    """[{"from", "name", "lines": [(INSTRUCTION, args)]}] in order; continuation lines
    joined, comments dropped."""
    stages, cur, buf = [], None, ""
    for raw in text.splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue  # a comment inside a continued instruction
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        line, buf = (buf + s).strip(), ""
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            cur = {"from": parts[0], "name": name, "lines": []}
            stages.append(cur)
        else:
            assert cur is not None, f"{word} before FROM"
            cur["lines"].append((word, rest))
    return stages


def copy_args(rest):
    """(flags, sources, dest) of a COPY instruction (shell form or JSON form)."""
    if rest.startswith("["):
        words = json.loads(rest)
    else:
        words = shlex.split(rest)
    flags = {}
    while words and words[0].startswith("--"):
        k, _, v = words.pop(0)[2:].partition("=")
        flags[k] = v
    assert len(words) >= 2, f"COPY needs a source and a destination: {rest}"
    return flags, words[:-1], words[-1]


# ---- .dockerignore (Docker's rules: last matching pattern wins, a pattern that matches a
# ---- parent directory matches everything under it, `!` re-includes, `**` any depth) -------


def ignore_patterns():
    if not DOCKERIGNORE.exists():
        return []
    pats = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        p = os.path.normpath(line[1:].strip() if neg else line).lstrip("/")
        pats.append((neg, pattern_regex(p)))
    return pats


def pattern_regex(p):
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif p.startswith("**", i):
            out += ".*"
            i += 2
        elif p[i] == "*":
            out += "[^/]*"
            i += 1
        elif p[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(p[i])
            i += 1
    return re.compile(out + r"\Z")


def ignored(rel, pats):
    parts = PurePosixPath(rel).parts
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    out = False
    for neg, rx in pats:
        if any(rx.match(p) for p in prefixes):
            out = not neg
    return out


def context_files(pats):
    """Every file of the build context (relative POSIX paths), as Docker would send it."""
    files = set()
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d != ".git"]
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), REPO).replace(os.sep, "/")
            if not ignored(rel, pats):
                files.add(rel)
    return files


def context_sources(src, files):
    """The context files a COPY source names (a file, a directory's contents, or a glob):
    [(path in the context, path relative to what is copied)]."""
    src = os.path.normpath(src).lstrip("/")
    if src == ".":
        return [(f, f) for f in sorted(files)]
    out = []
    for f in sorted(files):
        if f == src or (any(c in src for c in "*?[") and fnmatch.fnmatchcase(f, src)):
            out.append((f, os.path.basename(f)))
        elif f.startswith(src + "/"):
            out.append((f, f[len(src) + 1:]))
    return out


# ---- the replay -----------------------------------------------------------------------------


def in_root(root, path):
    return root / str(path).lstrip("/")


def replay_build_stage(stage, files, root):
    """Copy what the stage's COPY lines copy into root, run its RUN lines after the first
    COPY; returns the failures (empty when the stage builds)."""
    workdir = PurePosixPath("/")
    copied = False
    for word, rest in stage["lines"]:
        if word == "WORKDIR":
            workdir = workdir / rest
            in_root(root, workdir).mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            flags, srcs, dest = copy_args(rest)
            assert "from" not in flags, "the build stage copies from the context only"
            dest_path = workdir / dest
            to_dir = dest.endswith("/") or dest in (".", "./") or len(srcs) > 1
            for src in srcs:
                found = context_sources(src, files)
                if not found:
                    return [f"COPY {src}: not in the build context (after .dockerignore)"]
                single_file = len(found) == 1 and found[0][0] == os.path.normpath(src)
                for ctx_path, rel in found:
                    if single_file and not to_dir:
                        target = in_root(root, dest_path)
                    else:
                        target = in_root(root, dest_path / rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / ctx_path, target)
            copied = True
        elif word == "RUN" and copied:
            cmd = rest
            if cmd.startswith("["):
                cmd = shlex.join(json.loads(cmd))
            # as in the image: not inside another make
            env = {k: v for k, v in clean_env().items()
                   if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
            r = subprocess.run(["nice", "sh", "-c", cmd], cwd=in_root(root, workdir),
                               env=env, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                return [f"RUN {cmd}\nexit {r.returncode}\n--- stderr ---\n{r.stderr[-6000:]}"
                        f"\n--- stdout ---\n{r.stdout[-2000:]}"]
    return []


@pytest.fixture(scope="module")
def dockerfile():
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) >= 2, "multi-stage: build, then runtime"
    return stages


@pytest.fixture(scope="module")
def context():
    return context_files(ignore_patterns())


@pytest.fixture(scope="module")
def built(dockerfile, context, tmp_path_factory):
    """The scratch root after the replayed build stages: {stage name: (root, failures)}."""
    out = {}
    names = {s["name"] for s in dockerfile}
    used = set()
    for s in dockerfile:
        for word, rest in s["lines"]:
            if word == "COPY":
                frm = copy_args(rest)[0].get("from")
                if frm is not None:
                    assert frm in names, f"COPY --from={frm}: no such stage"
                    used.add(frm)
    for s in dockerfile:
        if s["name"] in used:
            root = tmp_path_factory.mktemp(f"stage-{s['name']}")
            out[s["name"]] = (root, replay_build_stage(s, context, root))
    return out


def test_dockerignore_matching_follows_docker():
    pats = [(False, pattern_regex("*")), (True, pattern_regex("src")),
            (False, pattern_regex("src/**/*.o"))]
    assert ignored("README.md", pats) and ignored("bench/chat_bench.c", pats)
    assert not ignored("src/main.c", pats) and not ignored("src/core/core.h", pats)
    assert ignored("src/core/core.o", pats) and ignored("src/x.o", pats)


def test_build_stage_builds_from_exactly_what_it_copies(built):
    assert built, "no stage is copied from"
    for name, (root, failures) in built.items():
        assert not failures, f"stage {name} does not build:\n" + "\n".join(failures)


def test_runtime_stage_sources_exist(dockerfile, context, built):
    runtime = dockerfile[-1]
    copies = [copy_args(rest) for word, rest in runtime["lines"] if word == "COPY"]
    assert copies, "the runtime stage copies the binaries and the web client"
    for flags, srcs, dest in copies:
        frm = flags.get("from")
        for src in srcs:
            if frm is None:
                assert context_sources(src, context), f"COPY {src}: not in the build context"
                continue
            root, failures = built[frm]
            assert not failures, f"stage {frm} did not build"
            matches = glob.glob(str(in_root(root, src)))
            assert matches, f"COPY --from={frm} {src}: the {frm} stage has no such file"
            for m in matches:
                if os.path.isfile(m) and "/bin/" in dest:
                    assert os.access(m, os.X_OK), f"{src} is not executable"
