"""Look inside a trained LSTM: the text coloured by one cell's activation, in a self-contained HTML page.

    lstmkit visualize CKPT --text FILE [--out visualize.html] [--max-chars 2000]
    python -m lstmkit.visualize --help

The checkpoint's language model reads the text once (batch 1, from zero state). For every layer
l, every step t and every cell j the page holds the six quantities of the LSTM step
    i, f, g, o   the gates after their nonlinearities       (T, H) each, from cache["gates"]
    c            the cell state                            (T, H), from cache["c"]
    h = o ⊙ tanh(c)   the hidden state                     (T, H)
and colours each character by the value it left behind: for c, h and g (signed) red for positive,
blue for negative; for the gates i, f, o (in [0, 1]) green, the deeper the more open. c is shown
relative to its cell's largest |c| over the text, the others on their own scale.

Choosing cells: the selector (or the URL: page.html#layer=0&kind=c&cell=17) switches layer, kind
and cell; the cells of each (layer, kind) are listed most interpretable first. The score of a cell
is the largest absolute Pearson correlation, over the text, between its activation and one of a
few properties of the text each character sits in:
    inside quotes        1 between an opening and a closing quote mark (" “ ” ‘ ’ 「 」 『 』), else 0
    inside parentheses   1 inside ( ), [ ], { }, else 0
    position in line     characters since the last newline
    position in word     characters since the last whitespace
(cells that count, or that switch on inside quotes, as in Karpathy, Johnson and Fei-Fei's
"Visualizing and Understanding Recurrent Networks", 2015, come first).

Gate saturation: per layer and gate, a histogram of its values over all cells and steps, with the
fraction of values near 0 (< 0.1) and near 1 (> 0.9) (for g, in [-1, 1]: below -0.9 and above 0.9).
A gate that is mostly saturated acts as a switch: copy the memory (f ≈ 1), ignore the input (i ≈ 0).

The page is one file: data, script and style inline, no network, no external fonts. Activations are
stored as int8 (value = q / 127 on the kind's scale), base64-encoded.

Shape letters: T tokens read, H hidden size, L layers, U displayed units (characters; words for a
word model), F text properties.
"""

from __future__ import annotations

import base64
import html
import json
import os
import sys

import numpy as np

from .cli import Parser, UsageError, write_output     # cli imports this module only inside main(): no cycle

KINDS = ("c", "h", "i", "f", "g", "o")
KIND_NAMES = {"c": "cell state c", "h": "hidden state h", "i": "input gate i", "f": "forget gate f",
              "g": "candidate g", "o": "output gate o"}
SIGNED = {"c", "h", "g"}
MARKER = b"<!-- lstmkit visualize -->"

OPEN_QUOTES, CLOSE_QUOTES, TOGGLE_QUOTES = "“‘「『", "”’」』", '"'
OPEN_PARENS, CLOSE_PARENS = "([{（", ")]}）"


# ---- what the text is like at each character ---------------------------------------------------

def text_features(units):
    """Properties of the text after each displayed unit: dict name -> (U,) float array."""
    names = ("inside quotes", "inside parentheses", "position in line", "position in word")
    out = {n: np.zeros(len(units)) for n in names}
    quote = paren = line = word = 0
    for u, text in enumerate(units):
        for ch in text:
            if ch in TOGGLE_QUOTES:
                quote = 1 - quote
            elif ch in OPEN_QUOTES:
                quote = 1
            elif ch in CLOSE_QUOTES:
                quote = 0
            elif ch in OPEN_PARENS:
                paren += 1
            elif ch in CLOSE_PARENS:
                paren = max(paren - 1, 0)
            line = 0 if ch == "\n" else line + 1
            word = 0 if ch.isspace() else word + 1
        out["inside quotes"][u] = quote
        out["inside parentheses"][u] = paren > 0
        out["position in line"][u] = line
        out["position in word"][u] = word
    return out


def interpretability(acts, features):
    """acts (U, H), features name -> (U,) -> score (H,), best feature name per cell, r (H,) signed.

    score_j = max_F |corr(acts[:, j], feature)|; a constant cell or feature correlates with nothing."""
    U, H = acts.shape
    a = acts - acts.mean(axis=0)
    a_norm = np.sqrt((a * a).sum(axis=0))                          # (H,)
    best = np.zeros(H)
    best_r = np.zeros(H)
    best_name = [""] * H
    for name, feat in features.items():
        f = feat - feat.mean()
        f_norm = np.sqrt(f @ f)
        if f_norm < 1e-12:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(a_norm > 1e-12, (f @ a) / (f_norm * np.maximum(a_norm, 1e-300)), 0.0)
        better = np.abs(r) > best
        best = np.where(better, np.abs(r), best)
        best_r = np.where(better, r, best_r)
        for j in np.flatnonzero(better):
            best_name[j] = name
    return best, best_name, best_r


# ---- running the model ------------------------------------------------------------------------

def display_units(tokenizer, text):
    """Split text into what is shown and coloured: (units, token index of each unit's last token or -1).

    Characters for char and jamo models (a Hangul syllable is 2-3 jamo tokens: the state after its
    last one is shown); words for a word model, with the spaces between them shown uncoloured."""
    kind = getattr(tokenizer, "kind", "char")
    units, last = [], []
    if kind == "word":
        tokens = tokenizer.tokenize(text)
        for j, tok in enumerate(tokens):
            if j > 0 and tok != "\n" and tokens[j - 1] != "\n":
                units.append(" ")
                last.append(-1)
            units.append(tok)
            last.append(j)
        return units, np.array(last, dtype=np.int64)
    t = -1
    for ch in text:
        t += len(tokenizer.tokenize(ch))
        units.append(ch)
        last.append(t)
    return units, np.array(last, dtype=np.int64)


def activations(model, ids):
    """ids (T,) -> list over layers of dict kind -> (T, H) float32, from one forward pass."""
    model.eval()
    _, _, cache = model.forward(np.asarray(ids, dtype=np.int64)[:, None])   # (T, 1) batch of one
    layers = []
    H = model.hidden_size
    for layer_caches in cache["lstm"]:
        lc = layer_caches[0]
        gates = np.asarray(lc["gates"])[:, 0]                      # (T, 4H): i, f, g, o
        c = np.asarray(lc["c"])[:, 0]                              # (T, H)
        acts = {"c": c, "h": gates[:, 3 * H:] * np.tanh(c)}
        for k, name in enumerate("ifgo"):
            acts[name] = gates[:, k * H:(k + 1) * H]
        layers.append({k: v.astype(np.float32) for k, v in acts.items()})
    return layers


# ---- the page ---------------------------------------------------------------------------------

def _quantise(values, kind):
    """(U, H) -> int8 codes and the per-cell scale: value ≈ q/127 * scale (signed), (q+127)/254 (gates)."""
    if kind in SIGNED:
        scale = np.maximum(np.abs(values).max(axis=0), 1e-6) if kind == "c" else np.ones(values.shape[1])
        q = np.rint(np.clip(values / scale, -1, 1) * 127)
    else:
        scale = np.ones(values.shape[1])
        q = np.rint(np.clip(values, 0, 1) * 254 - 127)
    return q.astype(np.int8), scale


def _histogram_svg(values, kind, width=220, height=96, bins=30):
    lo = -1.0 if kind == "g" else 0.0
    counts, _ = np.histogram(values, bins=bins, range=(lo, 1.0))
    frac = counts / max(values.size, 1)
    top = max(frac.max(), 1e-12)
    bw = width / bins
    bars = "".join(
        f'<rect x="{k * bw:.1f}" y="{height - 14 - (height - 20) * v / top:.1f}" width="{bw - 1:.1f}" '
        f'height="{(height - 20) * v / top:.1f}" fill="{"#3a7" if kind != "g" else "#c64"}"/>'
        for k, v in enumerate(frac))
    near_lo = float(np.mean(values < (-0.9 if kind == "g" else 0.1)))
    near_hi = float(np.mean(values > 0.9))
    lo_label = "< -0.9" if kind == "g" else "< 0.1"
    axis = (f'<line x1="0" y1="{height - 13}" x2="{width}" y2="{height - 13}" stroke="#888"/>'
            f'<text x="0" y="{height - 2}" font-size="10">{lo:g}</text>'
            f'<text x="{width - 6}" y="{height - 2}" font-size="10">1</text>')
    return (f'<figure class="hist"><svg width="{width}" height="{height}" role="img">{bars}{axis}</svg>'
            f'<figcaption><b>{kind}</b>: {near_lo:.0%} {lo_label}, {near_hi:.0%} &gt; 0.9</figcaption></figure>')


def build_page(model, tokenizer, text, *, title="lstmkit visualize", source=""):
    """The HTML page (a str) for `text` read by `model` (a lstmkit.model.LanguageModel)."""
    units, last = display_units(tokenizer, text)
    ids = tokenizer.encode(text)
    if len(last) and last.max() != len(ids) - 1:   # a tokenizer that does not split per character
        units, last = [tokenizer.decode([i]) for i in ids], np.arange(len(ids))
    layers = activations(model, ids)
    L, H = len(layers), model.hidden_size
    shown = last >= 0
    feats = text_features([u for u, s in zip(units, shown) if s])

    data, scales, ranks, top = {}, {}, {}, []
    for l, acts in enumerate(layers):
        for kind in KINDS:
            per_unit = acts[kind][last[shown]]                      # (U, H): the state after each unit
            q, scale = _quantise(per_unit, kind)
            data[f"{l}:{kind}"] = base64.b64encode(q.tobytes()).decode("ascii")
            scales[f"{l}:{kind}"] = [round(float(s), 5) for s in scale]
            score, fname, r = interpretability(per_unit.astype(np.float64), feats)
            order = np.argsort(-score, kind="stable")
            ranks[f"{l}:{kind}"] = [[int(j), round(float(score[j]), 3), fname[j], round(float(r[j]), 3)]
                                    for j in order]
            top += [(float(score[j]), l, kind, int(j), fname[j], float(r[j])) for j in order[:3]]
    top.sort(key=lambda x: -x[0])
    top = top[:12]
    best = top[0] if top and top[0][0] > 0 else (0.0, L - 1, "c", 0, "", 0.0)

    spans = []
    u_idx = 0
    for u, s in zip(units, shown):
        esc = html.escape(u)
        if u == "\n":
            esc = '<span class="nl">↵</span>\n'
        if s:
            spans.append(f'<span data-u="{u_idx}">{esc}</span>')
            u_idx += 1
        else:
            spans.append(esc)
    hist_rows = "".join(
        f'<div class="histrow"><div class="histlabel">layer {l}</div>'
        + "".join(_histogram_svg(layers[l][g], g) for g in "ifgo") + "</div>" for l in range(L))
    top_rows = "".join(
        f'<li><a href="#layer={l}&amp;kind={k}&amp;cell={j}">layer {l}, {k}, cell {j}</a>: '
        f'|r| = {s:.2f} with {html.escape(f)} ({"+" if r >= 0 else "−"})</li>' for s, l, k, j, f, r in top if s > 0)
    meta = {"L": L, "H": H, "U": u_idx, "kinds": list(KINDS), "signed": sorted(SIGNED),
            "names": KIND_NAMES, "scales": scales, "ranks": ranks,
            "default": {"layer": best[1], "kind": best[2], "cell": best[3]}}
    summary = (f"{L} layer{'s' if L > 1 else ''} × {H} cells, {tokenizer.kind} tokenizer, vocabulary "
               f"{tokenizer.vocab_size}; {len(ids)} tokens read")
    return _TEMPLATE.format(
        marker=MARKER.decode(), title=html.escape(title), source=html.escape(source),
        summary=html.escape(summary), text="".join(spans), hist=hist_rows, top=top_rows or "<li>(none)</li>",
        meta=json.dumps(meta, ensure_ascii=True).replace("</", "<\\/"),
        data=json.dumps(data).replace("</", "<\\/"))


_TEMPLATE = """<!DOCTYPE html>
{marker}
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px 24px; color: #222; background: #fff; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
.sub {{ color: #555; font-size: 13px; margin-bottom: 10px; }}
#controls {{ position: sticky; top: 0; background: #f4f4f4; padding: 8px 10px; border: 1px solid #ddd;
  border-radius: 4px; font-size: 14px; z-index: 1; }}
#controls select, #controls button {{ font-size: 14px; margin-right: 8px; }}
#sel {{ font-weight: bold; margin-left: 6px; }}
#legend {{ display: inline-block; width: 160px; height: 12px; vertical-align: middle; border: 1px solid #ccc; }}
#text {{ font-family: ui-monospace, monospace; font-size: 15px; line-height: 1.6; white-space: pre-wrap;
  word-break: break-all; border: 1px solid #ddd; padding: 10px; margin: 10px 0; }}
#text span[data-u] {{ border-radius: 2px; }}
.nl {{ color: #bbb; }}
#hover {{ font-family: ui-monospace, monospace; font-size: 13px; color: #333; min-height: 1.2em; }}
.histrow {{ display: flex; align-items: flex-end; gap: 14px; margin: 6px 0; }}
.histlabel {{ width: 60px; font-size: 13px; }}
.hist {{ margin: 0; font-size: 12px; }}
h2 {{ font-size: 16px; margin: 18px 0 6px; }}
ol {{ font-size: 14px; margin-top: 4px; }}
</style></head><body>
<h1>{title}</h1>
<div class="sub">{source} {summary}</div>
<div id="controls">
  layer <select id="layer"></select>
  show <select id="kind"></select>
  cell <select id="cell"></select>
  <button id="prev" title="previous cell in this list">◀</button><button id="next" title="next cell in this list">▶</button>
  <span id="legend"></span> <span id="legendtext"></span>
  <div>selected: <span id="sel"></span> <span id="why"></span></div>
  <div id="hover">&nbsp;</div>
</div>
<div id="text">{text}</div>
<h2>Most interpretable cells</h2>
<div class="sub">Score: the largest |Pearson r| between the cell's activation and a property of the text
(inside quotes, inside parentheses, position in line, position in word). Click to show one.</div>
<ol>{top}</ol>
<h2>Gate saturation</h2>
<div class="sub">Histograms of each gate's values over all cells and characters, and how often it is near
0 or 1 (near −1 or 1 for g). A saturated gate works as a switch.</div>
{hist}
<script id="meta" type="application/json">{meta}</script>
<script id="data" type="application/json">{data}</script>
<script>
"use strict";
const META = JSON.parse(document.getElementById("meta").textContent);
const DATA = JSON.parse(document.getElementById("data").textContent);
const decoded = {{}};
function codes(layer, kind) {{
  const key = layer + ":" + kind;
  if (!decoded[key]) {{
    const s = atob(DATA[key]);
    const a = new Int8Array(s.length);
    for (let n = 0; n < s.length; n++) a[n] = (s.charCodeAt(n) << 24) >> 24;
    decoded[key] = a;
  }}
  return decoded[key];
}}
const spans = Array.from(document.querySelectorAll("#text span[data-u]"));
const $ = (id) => document.getElementById(id);
const signed = (kind) => META.signed.includes(kind);
function colour(q, kind) {{
  if (signed(kind)) {{
    const v = q / 127;
    return v >= 0 ? `rgba(220, 50, 32, ${{v.toFixed(3)}})` : `rgba(30, 100, 220, ${{(-v).toFixed(3)}})`;
  }}
  return `rgba(20, 150, 60, ${{((q + 127) / 254).toFixed(3)}})`;
}}
function value(q, layer, kind, cell) {{
  if (signed(kind)) return q / 127 * META.scales[layer + ":" + kind][cell];
  return (q + 127) / 254;
}}
let state = Object.assign({{}}, META.default);
function parseHash() {{
  const p = new URLSearchParams(location.hash.slice(1));
  const s = Object.assign({{}}, META.default);
  const layer = parseInt(p.get("layer"), 10);
  if (layer >= 0 && layer < META.L) s.layer = layer;
  if (META.kinds.includes(p.get("kind"))) s.kind = p.get("kind");
  const cell = parseInt(p.get("cell"), 10);
  if (cell >= 0 && cell < META.H) s.cell = cell;
  return s;
}}
function setHash(s) {{ location.hash = `layer=${{s.layer}}&kind=${{s.kind}}&cell=${{s.cell}}`; }}
function fillSelectors() {{
  const ls = $("layer"), ks = $("kind"), cs = $("cell");
  if (!ls.options.length) {{
    for (let l = 0; l < META.L; l++) ls.add(new Option("layer " + l, l));
    for (const k of META.kinds) ks.add(new Option(META.names[k], k));
  }}
  ls.value = state.layer; ks.value = state.kind;
  cs.innerHTML = "";
  for (const [j, score, feat, r] of META.ranks[state.layer + ":" + state.kind]) {{
    const label = score > 0 ? `cell ${{j}}  |r|=${{score.toFixed(2)}} ${{feat}}` : `cell ${{j}}`;
    cs.add(new Option(label, j));
  }}
  cs.value = state.cell;
}}
function render() {{
  const a = codes(state.layer, state.kind), H = META.H, cell = state.cell, kind = state.kind;
  for (let u = 0; u < spans.length; u++) spans[u].style.backgroundColor = colour(a[u * H + cell], kind);
  $("sel").textContent = `layer ${{state.layer}} · ${{kind}} · cell ${{cell}}`;
  const rank = META.ranks[state.layer + ":" + kind].find((x) => x[0] === cell);
  $("why").textContent = rank && rank[1] > 0 ? `(|r| = ${{rank[1].toFixed(2)}} with ${{rank[2]}})` : "";
  if (signed(kind)) {{
    $("legend").style.background = "linear-gradient(to right, rgb(30,100,220), #fff, rgb(220,50,32))";
    const s = kind === "c" ? META.scales[state.layer + ":c"][cell] : 1;
    $("legendtext").textContent = `${{(-s).toFixed(2)}} … 0 … ${{s.toFixed(2)}}`;
  }} else {{
    $("legend").style.background = "linear-gradient(to right, #fff, rgb(20,150,60))";
    $("legendtext").textContent = "0 … 1";
  }}
  document.body.dataset.selected = `${{state.layer}}:${{kind}}:${{cell}}`;
}}
function update() {{ state = parseHash(); fillSelectors(); render(); }}
$("layer").addEventListener("change", (e) => setHash(Object.assign({{}}, state, {{layer: +e.target.value}})));
$("kind").addEventListener("change", (e) => setHash(Object.assign({{}}, state, {{kind: e.target.value}})));
$("cell").addEventListener("change", (e) => setHash(Object.assign({{}}, state, {{cell: +e.target.value}})));
function step(d) {{
  const list = META.ranks[state.layer + ":" + state.kind].map((x) => x[0]);
  const n = (list.indexOf(state.cell) + d + list.length) % list.length;
  setHash(Object.assign({{}}, state, {{cell: list[n]}}));
}}
$("prev").addEventListener("click", () => step(-1));
$("next").addEventListener("click", () => step(1));
document.addEventListener("keydown", (e) => {{ if (e.key === "j") step(1); if (e.key === "k") step(-1); }});
$("text").addEventListener("mouseover", (e) => {{
  const u = e.target.dataset ? e.target.dataset.u : undefined;
  if (u === undefined) return;
  const q = codes(state.layer, state.kind)[u * META.H + state.cell];
  $("hover").textContent = `${{JSON.stringify(e.target.textContent)}} (#${{u}}): ` +
    `${{state.kind}} = ${{value(q, state.layer, state.kind, state.cell).toFixed(3)}}`;
}});
window.addEventListener("hashchange", update);
update();
</script>
</body></html>
"""


# ---- command line ---------------------------------------------------------------------------

def build_parser(prog="lstmkit visualize"):
    p = Parser(prog=prog, description="Write a self-contained HTML page showing a text coloured by the "
                "activations of a trained LSTM's cells, most interpretable cells first, with gate-saturation "
                "histograms.")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint: a run directory written by `lstmkit train`")
    p.add_argument("--text", required=True, metavar="FILE",
                   help="UTF-8 text to read (a file, or a built-in corpus name: mujeong, shakespeare)")
    p.add_argument("--out", default="visualize.html", help="HTML file to write (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=2000,
                   help="read only the first N characters of the text (default: %(default)s)")
    p.add_argument("--start", type=int, default=0,
                   help="skip the first N characters of the text (default: %(default)s)")
    return p


def main(argv=None, prog="lstmkit visualize"):
    """Command-line entry point; returns the exit code."""
    from .checkpoint import atomic_write, check_output, load_checkpoint
    from .config import LMError
    from .data import read_text

    try:
        args = build_parser(prog).parse_args(argv)
        if args.max_chars < 1:
            raise UsageError(f"--max-chars must be >= 1, got {args.max_chars}")
        if args.start < 0:
            raise UsageError(f"--start must be >= 0, got {args.start}")
        check_output(args.out, MARKER, "a page written by lstmkit visualize")
        model, tokenizer, _ = load_checkpoint(args.ckpt)
        text = read_text(args.text)[args.start:args.start + args.max_chars]
        if not text:
            raise UsageError(f"--text {args.text!r} has no characters after --start {args.start}")
        tokenizer.check_known(text, "--text")
    except SystemExit as e:       # --help
        return int(e.code or 0)
    except LMError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    page = build_page(model, tokenizer, text, title="Inside the LSTM",
                      source=f"{os.path.basename(os.path.abspath(args.ckpt))} reading {os.path.basename(args.text)}:")
    data = page.encode("utf-8")
    # atomic: a reader never sees half a page
    if not write_output(prog, args.out, lambda: atomic_write(args.out, lambda f: f.write(data))):
        return 1
    print(f"wrote {args.out} ({len(data) / 1e6:.1f} MB): open it in a browser")
    return 0


if __name__ == "__main__":
    sys.exit(main())
