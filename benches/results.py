#!/usr/bin/env python3
"""benches/results.py: turn the figures a benchmark script recorded into its results file,
benches/results/<script>.json (one file per script run; a new run replaces it).

Used by benches/lib.sh (bench_begin: `results.py source`; bench_finish:
`results.py write SCRIPT RECORDS OUTDIR`), where RECORDS is
a tab-separated file of lines
    started <iso date>
    command <command line>
    source  <JSON of the commit and work tree, taken when the run started: `results.py source`>
    binary  <path> <build time>
    param   <name> <value> <default>
    metric  <id> <unit> <label> [key=value ...]   keys: subject refs better target cache note headline
    value   <id> <system> <number | null>
written by the script while it measures. The results file adds what was measured and where:
the git commit (and whether the work tree had changes), the date, the machine (nproc, RAM,
kernel, CPU), and for each figure its unit, its values per system and the ratio of the subject
(Tessera) to each reference measured in the same run. Nothing in it is typed by hand.

Units: MB = 10^6 bytes, MiB = 2^20 bytes (MB/s and MiB/s likewise).
"""
import datetime
import json
import os
import platform
import subprocess
import sys

SCHEMA = 1


def git(*args, cwd=None, strip=True):
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout
        return out.strip() if strip else out
    except (OSError, subprocess.CalledProcessError):
        return None


def source_info(repo):
    commit = git("rev-parse", "HEAD", cwd=repo)
    status = git("status", "--porcelain", "--untracked-files=no", cwd=repo, strip=False)
    return {
        "commit": commit,
        "commit_short": commit[:7] if commit else None,
        "commit_subject": git("log", "-1", "--format=%s", cwd=repo),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD", cwd=repo),
        # tracked files changed since the commit: the figures are of a build that is not exactly it
        # (unless only files the measurement does not build, like benches/*.sh, changed)
        "dirty": bool(status.strip()) if status is not None else None,
        "dirty_files": [line[3:] for line in status.splitlines() if line.strip()] if status else [],
    }


def machine_info():
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "mem_total_bytes": mem,
        "mem_total_gib": round(mem / 2**30, 1) if mem else None,
        "kernel": platform.release(),
        "cpu": cpu,
    }


def number(s):
    if s in ("", "null", "n/a", "NA", "FAILED"):
        return None
    v = float(s)
    return int(v) if v.is_integer() and abs(v) < 2**53 and "." not in s and "e" not in s.lower() else v


def parse_records(path):
    out = {"started": None, "command": None, "source": None, "binary": None, "params": {}, "full_size": True, "figures": []}
    figs = {}
    for raw in open(path, encoding="utf-8"):
        parts = raw.rstrip("\n").split("\t")
        kind = parts[0]
        if kind == "started":
            out["started"] = parts[1]
        elif kind == "command":
            out["command"] = parts[1]
        elif kind == "source":
            out["source"] = json.loads(parts[1])
        elif kind == "binary":
            out["binary"] = {"path": parts[1], "built": parts[2]}
        elif kind == "param":
            name, value, default = parts[1], parts[2], parts[3] if len(parts) > 3 else parts[2]
            out["params"][name] = {"value": value, "default": default}
            if value != default:
                out["full_size"] = False
        elif kind == "metric":
            fid, unit, label = parts[1], parts[2], parts[3]
            f = figs.setdefault(fid, {"id": fid, "values": {}})
            f.update({"label": label, "unit": unit})
            for kv in parts[4:]:
                if not kv:
                    continue
                k, v = kv.split("=", 1)
                if k == "refs":
                    f["refs"] = [r for r in v.split(",") if r]
                elif k == "headline":
                    f["headline"] = v not in ("0", "", "false")
                else:
                    f[k] = v
            if f not in out["figures"]:
                out["figures"].append(f)
        elif kind == "value":
            fid, system, value = parts[1], parts[2], parts[3]
            f = figs.setdefault(fid, {"id": fid, "values": {}})
            f["values"][system] = number(value)
            if f not in out["figures"]:
                out["figures"].append(f)
        else:
            raise SystemExit(f"results.py: unknown record {kind!r} in {path}")
    for f in out["figures"]:
        f.setdefault("label", f["id"])
        f.setdefault("unit", "")
        subject, refs = f.get("subject"), f.get("refs", [])
        if subject:
            f["ratios"] = {}
            for r in refs:
                a, b = f["values"].get(subject), f["values"].get(r)
                f["ratios"][f"{subject}/{r}"] = round(a / b, 4) if a is not None and b else None
    return out


def write(script, records, outdir, repo):
    rec = parse_records(records)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    doc = {
        "schema": SCHEMA,
        "script": script,
        "command": rec["command"],
        "date": now.isoformat().replace("+00:00", "Z"),
        "started": rec["started"],
        # the commit and work tree when the run started (what was built and measured), else now
        "source": rec["source"] or source_info(repo),
        "machine": machine_info(),
        "binary": rec["binary"],
        "params": rec["params"],
        # every size parameter at its default: the run is of the reference size (else a small
        # development run, which the report marks as such)
        "full_size": rec["full_size"],
        "figures": rec["figures"],
    }
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"{script}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    print(f"bench: results written to {path}", file=sys.stderr)
    return path


def main(argv):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if len(argv) >= 4 and argv[0] == "write":
        write(argv[1], argv[2], argv[3], repo)
        return 0
    if argv == ["source"]:
        print(json.dumps(source_info(repo), ensure_ascii=False))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
