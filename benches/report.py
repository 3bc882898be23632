#!/usr/bin/env python3
"""benches/report.py: the figure tables of benches/README.md and the summary in README.md's
"Benchmarks" section, generated from the results files the benchmark scripts write
(benches/results/<script>.json, see benches/results.py). `make bench-report` runs it.

  report.py              rewrite the generated blocks of benches/README.md and README.md
  report.py --check      exit 1 if a generated block is not what the results files give
  report.py --print S    print the section of script S (e.g. nfs_meta) to stdout
Env: BENCH_RESULTS_DIR (default benches/results).

Generated blocks sit between markers, everything outside them is left alone:
  benches/README.md  <!-- bench:begin SCRIPT --> ... <!-- bench:end SCRIPT -->  one per script
  README.md          <!-- bench:begin --> ... <!-- bench:end -->                the summary
A script without a results file yet shows its last hand-written figures (benches/legacy/), marked
"not yet regenerated"; figures are never typed into results files.
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.environ.get("BENCH_RESULTS_DIR", os.path.join(ROOT, "benches", "results"))
LEGACY = os.path.join(ROOT, "benches", "legacy")

# script -> (how it is run, title in the summary)
SCRIPTS = {
    "engine": ("cargo bench --bench engine", "engine"),
    "clone": ("benches/clone.sh", "clone latency"),
    "fio": ("benches/fio.sh", "fio through the mount"),
    "rss": ("benches/rss.sh", "memory"),
    "nfs": ("benches/nfs.sh", "NFS data path vs nfs-ganesha"),
    "nfs_meta": ("benches/nfs_meta.sh", "NFS metadata and sync vs nfs-ganesha"),
    "vdi": ("benches/vdi.sh", "VDI profile through qemu's NFS client vs nfs-ganesha"),
    "space": ("benches/space.sh", "reclamation and scrub"),
    "corpus": ("benches/corpus.sh", "VDI corpus: space against the dedup floor"),
    "bootstorm": ("benches/bootstorm.sh", "boot storm: clones of one golden image read at once"),
    "replication": ("benches/replication.sh", "replication between two datastores"),
    "s3": ("benches/s3.sh", "S3-backed datastore against a local one"),
}


def load(script):
    path = os.path.join(RESULTS, f"{script}.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def legacy(script, kind):
    path = os.path.join(LEGACY, f"{script}.{kind}.md")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip("\n")


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if unit == "x":
        return f"{v:.2f}"
    a = abs(v)
    if a >= 100 or float(v).is_integer():
        return f"{v:,.0f}".replace(",", " ")
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def ratio(v):
    return "n/a" if v is None else f"{v:.2f}x"


def label(f):
    s = f.get("label", f["id"])
    cache = f.get("cache")
    if cache == "cold":
        s += " (cold)"
    elif cache == "warm":
        s += " (**warm**: the page-cache drop failed)"
    return s


def when(iso):
    return iso.replace("T", " ").rstrip("Z")[:16] + " UTC"


def unit_text(f):
    unit = f.get("unit", "")
    return unit + (f" ({f['better']} is better)" if f.get("better") else "")


def measured_on(doc):
    src, m = doc.get("source", {}), doc.get("machine", {})
    commit = f"`{src.get('commit_short')}`"
    if src.get("dirty"):
        files = src.get("dirty_files", [])
        commit += " + uncommitted changes" + (f" to {', '.join(files[:5])}" if files else "")
        commit += "" if len(files) <= 5 else f" and {len(files) - 5} more"
    mem = m.get("mem_total_gib")
    s = (f"measured on commit {commit}, {when(doc['date'])}, {m.get('nproc')} cores, {mem} GiB RAM, "
         f"kernel {m.get('kernel')}")
    if doc.get("binary"):
        s += f"; tessera binary built {when(doc['binary']['built'])}"
    return s


def params_text(doc):
    ps = doc.get("params", {})
    if not ps:
        return ""
    parts = []
    for k, p in ps.items():
        parts.append(f"{k}={p['value']}" + ("" if p["value"] == p["default"] else f" (default {p['default']})"))
    return ", ".join(parts)


def section(script):
    doc = load(script)
    how = SCRIPTS[script][0]
    out = []
    if doc is None:
        old = legacy(script, "table")
        out.append(f"**{'Not yet regenerated' if old else 'No results yet'}**: no "
                   f"`benches/results/{script}.json` yet; run `{how}` (or `make bench`), then "
                   "`make bench-report`.")
        if old:
            out.append("")
            out.append("Last hand-written figures, kept until then (not from a results file):")
            out.append("")
            out.append(old)
        return "\n".join(out)
    out.append(f"`{doc.get('command') or how}`: {measured_on(doc)}.")
    pt = params_text(doc)
    if pt:
        out[-1] += f" Parameters: {pt}."
    if not doc.get("full_size", True):
        out.append("")
        out.append("**Small development run, not the reference size**: rerun with the defaults.")
    figs = doc.get("figures", [])
    systems, pairs = [], []
    for f in figs:
        for s in f.get("values", {}):
            if s not in systems:
                systems.append(s)
        for p in f.get("ratios", {}):
            if p not in pairs:
                pairs.append(p)
    has_target = any(f.get("target") for f in figs)
    out.append("")
    if len(systems) <= 3:
        # one column per system (Tessera and its references), one per ratio
        head = ["figure", "unit", *systems, *pairs] + (["target"] if has_target else [])
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for f in figs:
            row = [label(f), unit_text(f)]
            row += [fmt(f["values"][s], f.get("unit", "")) if s in f.get("values", {}) else "" for s in systems]
            row += [ratio(f["ratios"][p]) if p in f.get("ratios", {}) else "" for p in pairs]
            if has_target:
                row.append(f.get("target", ""))
            out.append("| " + " | ".join(row) + " |")
    else:
        # figures of different kinds: the measured value, then its references from the same run
        head = ["figure", "unit", "measured", "reference (same run)", "ratio"] + (["target"] if has_target else [])
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for f in figs:
            vals, unit = f.get("values", {}), f.get("unit", "")
            subj = f.get("subject") or (next(iter(vals)) if len(vals) == 1 else None)
            refs = f.get("refs", [])
            if subj in vals:
                measured = fmt(vals[subj], unit) + ("" if subj == "tessera" or not refs else f" ({subj})")
            else:
                measured = ", ".join(f"{k} {fmt(v, unit)}" for k, v in vals.items())
            reference = "; ".join(f"{r} {fmt(vals.get(r), unit)}" for r in refs)
            rat = "; ".join(ratio(v) for v in f.get("ratios", {}).values())
            row = [label(f), unit_text(f), measured, reference, rat]
            if has_target:
                row.append(f.get("target", ""))
            out.append("| " + " | ".join(row) + " |")
    notes = [(f.get("label", f["id"]), f["note"]) for f in figs if f.get("note")]
    if notes:
        out.append("")
        out += [f"- {lab}: {n}" for lab, n in notes]
    return "\n".join(out)


def summary_line(script):
    doc = load(script)
    how, title = SCRIPTS[script]
    if doc is None:
        old = legacy(script, "summary")
        if not old:
            return f"- {title} (`{how}`): **no results yet**"
        return f"- {title} (`{how}`): **not yet regenerated**; last hand-written figures: {old}"
    src = doc.get("source", {})
    commit = f"`{src.get('commit_short')}`" + ("+changes" if src.get("dirty") else "")
    small = "; **small development run**" if not doc.get("full_size", True) else ""
    items = []
    for f in doc.get("figures", []):
        if not f.get("headline"):
            continue
        vals = f.get("values", {})
        subj = f.get("subject")
        if subj and f.get("refs"):
            ref = f["refs"][0]
            r = f.get("ratios", {}).get(f"{subj}/{ref}")
            items.append(f"{label(f)}: {fmt(vals.get(subj))} {f.get('unit', '')} vs {ref} "
                         f"{fmt(vals.get(ref))} ({ratio(r)})")
        else:
            items.append(f"{label(f)}: " + ", ".join(f"{s} {fmt(v)} {f.get('unit', '')}" for s, v in vals.items()))
    return (f"- {title} (`{how}`, commit {commit}, {doc['date'][:10]}{small}): "
            + ("; ".join(items) if items else "see benches/README.md"))


def summary():
    return "\n".join(summary_line(s) for s in SCRIPTS)


def replace_block(text, name, body, path):
    tag = f" {name}" if name else ""
    begin, end = f"<!-- bench:begin{tag} -->", f"<!-- bench:end{tag} -->"
    pat = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
    if not pat.search(text):
        raise SystemExit(f"report.py: {path} has no {begin} ... {end} block")
    return pat.sub(lambda _m: f"{begin}\n{body}\n{end}", text, count=1)


def render():
    """{path: new text} for both READMEs."""
    out = {}
    p = os.path.join(ROOT, "benches", "README.md")
    text = open(p, encoding="utf-8").read()
    for s in SCRIPTS:
        text = replace_block(text, s, section(s), p)
    out[p] = text
    p = os.path.join(ROOT, "README.md")
    text = open(p, encoding="utf-8").read()
    out[p] = replace_block(text, "", summary(), p)
    return out


def main(argv):
    if argv[:1] == ["--print"] and len(argv) == 2:
        print(section(argv[1]))
        return 0
    new = render()
    if argv[:1] == ["--check"]:
        stale = [p for p, t in new.items() if open(p, encoding="utf-8").read() != t]
        for p in stale:
            print(f"report.py: {os.path.relpath(p, ROOT)} is not what the results files give "
                  "(run make bench-report)", file=sys.stderr)
        return 1 if stale else 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    for p, t in new.items():
        if open(p, encoding="utf-8").read() != t:
            with open(p, "w", encoding="utf-8") as f:
                f.write(t)
            print(f"report.py: rewrote {os.path.relpath(p, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
