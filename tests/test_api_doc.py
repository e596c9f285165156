"""``docs/api.md`` stays true to the code: its names, its signatures, its examples.

The page quotes each public callable's signature in a ```` ```pyi ```` block; every quoted
signature is parsed and compared with :func:`inspect.signature` (names, kinds, annotations,
defaults, return annotation), and every callable of ``leo.__all__`` must be quoted once.
The ``LEOConfig`` field table must list every field with its real default, every name of
``leo.__all__`` must appear on the page, and every file it links or names must exist. Then
the page's ```` ```python ```` blocks run in order, in one namespace, in a temporary
directory, and what they leave is checked against independent computations: the
meta-loss against its terms recomputed in float64, the query loss against
:func:`leo.adapt` plus a plain cross-entropy, the outer step against autograd, hand
clipping and the first Adam step in closed form, the comparison's ``leo`` row against
:func:`leo.evaluate` on the same episodes.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import leo

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "api.md"
TEXT = DOC.read_text()
ASKED = ["leo", "nearest-mean-cosine", "logistic-regression"]  # the example's methods


def fenced(lang: str, text: str = TEXT) -> list[str]:
    """The bodies of the ```lang fenced blocks of a Markdown text, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def section(heading: str) -> str:
    """The page's text from the heading line ``heading`` to the next heading."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#|\Z)", TEXT, re.S | re.M)
    assert match, f"docs/api.md: no heading {heading!r}"
    return match.group(1)


def quoted_signatures() -> dict[str, str]:
    """``{name: "(...) -> ..."}`` of every ``leo.name(...)`` entry of the pyi blocks."""
    out: dict[str, str] = {}
    for block in fenced("pyi"):
        for entry in re.split(r"^(?=leo\.)", block, flags=re.M):
            if entry.strip():
                match = re.fullmatch(r"leo\.(\w+)(\(.*)", entry.strip(), re.S)
                assert match, f"docs/api.md: not a signature: {entry.strip()[:60]!r}"
                name, rest = match.groups()
                assert name not in out, f"docs/api.md: leo.{name} quoted twice"
                out[name] = rest
    return out


def _norm(annotation) -> str | None:
    """An annotation as normalised source text (None: none)."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return ast.unparse(ast.parse(text, mode="eval"))


def parse_quoted(name: str, rest: str) -> tuple[list[tuple], str | None]:
    """(parameters as (kind, name, annotation, (type, default)), return annotation)."""
    fn = ast.parse(f"def {name}{rest}:\n    pass").body[0]
    a = fn.args
    params = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        kind = "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        params.append((kind, arg.arg, _unparse(arg.annotation), _default(default)))
    if a.vararg:
        params.append(("VAR_POSITIONAL", a.vararg.arg, _unparse(a.vararg.annotation), None))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        params.append(("KEYWORD_ONLY", arg.arg, _unparse(arg.annotation), _default(default)))
    if a.kwarg:
        params.append(("VAR_KEYWORD", a.kwarg.arg, _unparse(a.kwarg.annotation), None))
    return params, _unparse(fn.returns)


def _unparse(node: ast.expr | None) -> str | None:
    return None if node is None else ast.unparse(node)


def _default(node: ast.expr | None) -> tuple[str, object] | None:
    """A quoted default as (type name, value); None: no default."""
    if node is None:
        return None
    value = ast.literal_eval(node)
    return (type(value).__name__, value)


def real_signature(obj) -> tuple[list[tuple], str | None]:
    """The same shape as :func:`parse_quoted`, from the code."""
    factories = {}
    if dataclasses.is_dataclass(obj):
        factories = {
            f.name: f.default_factory
            for f in dataclasses.fields(obj)
            if f.default_factory is not dataclasses.MISSING
        }
    sig = inspect.signature(obj)
    params = []
    for p in sig.parameters.values():
        if p.name in factories:
            value = factories[p.name]()
            default = (type(value).__name__, value)
        elif p.default is inspect.Parameter.empty:
            default = None
        else:
            default = (type(p.default).__name__, p.default)
        params.append((p.kind.name, p.name, _norm(p.annotation), default))
    returns = None if inspect.isclass(obj) else _norm(sig.return_annotation)
    return params, returns


# ----------------------------------------------------------------------------- the page


def test_every_public_name_is_on_the_page():
    spans = re.findall(r"`([^`\n]+)`", TEXT) + re.findall(r"^#+ .*$", TEXT, re.M)
    spans += fenced("pyi")
    missing = [name for name in leo.__all__ if not any(re.search(rf"\b{name}\b", s) for s in spans)]
    assert not missing, f"docs/api.md does not name {missing}"


def test_every_callable_is_quoted_with_its_real_signature():
    quoted = quoted_signatures()
    callables = {n for n in leo.__all__ if callable(getattr(leo, n))} - {"LEOConfig"}
    assert set(quoted) == callables, "docs/api.md: quoted signatures != leo.__all__'s callables"
    for name, rest in quoted.items():
        doc_params, doc_returns = parse_quoted(name, rest)
        params, returns = real_signature(getattr(leo, name))
        assert doc_params == params, f"docs/api.md: leo.{name}'s parameters"
        assert doc_returns == returns, f"docs/api.md: leo.{name}'s return annotation"


def test_signature_check_catches_a_wrong_default():
    rest = quoted_signatures()["evaluate"].replace("seed: int = 1", "seed: int = 2")
    assert parse_quoted("evaluate", rest) != real_signature(leo.evaluate)


def test_config_table_lists_every_field_with_its_default():
    table = dict(
        re.findall(r"`(\w+)=([^`]+)`", section("`leo.LEOConfig` fields and their defaults"))
    )
    fields = {f.name: f.default for f in dataclasses.fields(leo.LEOConfig)}
    assert set(table) == set(fields)
    for name, source in table.items():
        value = ast.literal_eval(source)
        assert type(value) is type(fields[name]) and value == fields[name], name


def test_pipeline_config_is_as_described():
    cfg = leo.load_run_config("1shot", params=REPO / "params.yaml")
    assert (cfg.num_steps, cfg.outer_lr, cfg.finetune_lr_init) == (4000, 1e-3, 1.0)
    said = "4,000 steps at 1e-3, the fine-tuning step size starting at 1.0"
    assert said in " ".join(TEXT.split())


def test_presets_and_paths_named_exist():
    for preset in leo.PRESETS:
        assert f"`{preset}`" in section("Config and presets"), preset
    links = re.findall(r"\]\(([\w./-]+\.md)\)", TEXT)
    paths = [
        s for s in re.findall(r"`([^`\n]+)`", TEXT) if re.fullmatch(r"[\w.-]+/[\w/.-]+\.(py|md)", s)
    ]
    assert links and paths
    for link in links:
        assert (DOC.parent / link).is_file(), link
    for path in paths:
        assert (REPO / path).is_file(), path


# ----------------------------------------------------------------------------- the examples


@pytest.fixture(scope="module")
def ran(tmp_path_factory, one_thread):
    """Run the page's python blocks: (namespace after each block, stdout of each, warnings,
    working directory)."""
    work = tmp_path_factory.mktemp("api-doc")
    namespace: dict = {"__name__": "api_doc"}
    states, outputs = [], []
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.chdir(work)
        for i, code in enumerate(fenced("python")):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{DOC.name}:block{i}", "exec"), namespace)
            states.append(dict(namespace))
            outputs.append(out.getvalue())
    return states, outputs, [str(w.message) for w in caught], work


def test_store_holds_the_normalised_arrays(ran):
    states, _, _, work = ran
    ns = states[0]
    raw = ns["x"].reshape(-1, ns["DIM"])  # the last split written: test
    expect = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(ns["test"].embeddings.numpy(), expect, rtol=1e-5, atol=1e-6)
    assert ns["test"].class_counts().tolist() == [30] * 20
    names = [set(ns[s].class_names) for s in ("train", "val", "test")]
    assert len(set().union(*names)) == 60  # disjoint
    meta = leo.read_metadata(work / "emb" / "test.parquet")
    assert (meta["num_rows"], meta["embedding_dim"]) == (600, 32)


def test_training_evaluation_and_table(ran):
    states, _, caught, work = ran
    ns = states[0]
    result, scores, table = ns["result"], ns["scores"], ns["table"]
    assert result.steps == 60 and [row["step"] for row in result.history] == [30, 60]
    assert Path(result.checkpoint) == Path("runs/leo/best.pt")
    assert (work / "runs" / "leo" / "best.pt").is_file()
    assert scores.num_episodes == 400 and scores.queries_per_class == 29  # 30 - 1 shot
    assert ((scores.accuracies >= 0) & (scores.accuracies <= 1)).all()
    assert not [w for w in caught if "queries per class" in w]
    assert list(table["methods"]) == ASKED
    assert len({row["episodes_sha256"] for row in table["methods"].values()}) == 1
    assert table["methods"]["leo"]["accuracy"] == pytest.approx(scores.mean, abs=1e-12)
    per_episode = np.load(work / "runs" / "compare" / "accuracies.npz")
    for name, row in table["methods"].items():
        assert 0 <= row["accuracy"] <= 1
        assert row["accuracy"] == pytest.approx(per_episode[name].mean(), abs=1e-12)
    for name in ASKED[1:]:  # separable clusters: far above the 20% of chance
        assert table["methods"][name]["accuracy"] > 0.6
    markdown = (work / "reports" / "table.md").read_text()
    assert all(f"| {name} |" in markdown for name in ASKED)


def test_bad_input_is_refused_in_one_line_before_anything_is_written(ran):
    _, outputs, _, work = ran
    last = outputs[0].splitlines()[-3:]  # the refusals, printed last: one line each
    printed = dict(line.split(": ", 1) for line in last)
    assert list(printed) == ["typo", "other data", "other config"]
    assert printed["typo"] == "LEO config: num_shot: unknown key"
    assert "runs/leo/state.pt" in printed["other data"] and "other data" in printed["other data"]
    assert "dropout=0.3" in printed["other config"] and "best.pt" in printed["other config"]
    assert not (work / "x").exists()  # compare checked the config before writing


def _ce(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def test_meta_loss_is_query_plus_weighted_terms_plus_regularisers(ran):
    ns = ran[0][1]
    cfg, before = ns["cfg"], {k: v.double().numpy() for k, v in ns["before"].items()}
    q, kl, pen = (float(ns[k].detach()) for k in ("query_loss", "kl", "penalty"))
    l2 = sum(0.5 * (w**2).sum() for k, w in before.items() if k not in leo.STEP_SIZE_NAMES)
    w = before["decoder.0"]  # (Z, 2D), the only decoder layer
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    orth = ((unit @ unit.T - np.eye(len(w))) ** 2).mean()
    terms = [
        q,
        cfg.kl_weight * kl,
        cfg.encoder_penalty_weight * pen,
        cfg.l2_penalty_weight * l2,
        cfg.orthogonality_penalty_weight * orth,
    ]
    loss = float(ns["loss"].detach())
    assert math.isfinite(loss) and ns["loss"].shape == ()
    assert loss == pytest.approx(sum(terms), rel=1e-5)
    assert min(terms) > 10 * 1e-5 * loss  # each term counts: leaving one out fails
    # the query loss is adapt's classifier on the dropped-out queries, plain cross-entropy
    params = {k: v.detach() for k, v in ns["before"].items()}
    out = leo.adapt(params, ns["xs"], cfg, training=True, noise=ns["one"])
    n, nq, d = ns["xq"].shape
    xq = (ns["xq"] * ns["one"]["query_keep"]).reshape(n * nq, d).double().numpy()
    logits = xq @ out["w_bar"].double().numpy().T
    labels = np.repeat(np.arange(n), nq)
    assert q == pytest.approx(_ce(logits, labels), rel=1e-5)
    assert kl == pytest.approx(float(out["kl"]), rel=1e-6)
    assert float(ns["accuracy"].detach()) == pytest.approx((logits.argmax(1) == labels).mean())


def test_meta_step_is_one_clipped_adam_step_against_the_gradient(ran):
    ns = ran[0][1]
    cfg, metrics, noise = ns["cfg"], ns["metrics"], ns["noise"]
    assert set(metrics) == {"loss", "query_loss", "kl", "encoder_penalty", "accuracy"}
    # the batch's meta-loss by autograd, from the per-episode functions
    params = {k: v.clone().requires_grad_() for k, v in ns["before"].items()}
    terms = [
        leo.episode_loss(params, xs, xq, cfg, {k: v[b] for k, v in noise.items()})
        for b, (xs, xq) in enumerate(zip(ns["xs_batch"], ns["xq_batch"], strict=True))
    ]
    q, kl, pen, _ = (torch.stack(t) for t in zip(*terms, strict=True))
    loss = leo.meta_loss(params, q, kl, pen, cfg)
    assert float(metrics["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    grads = torch.autograd.grad(loss, list(params.values()))
    lr, b1, b2, eps = cfg.outer_lr, 0.9, 0.999, 1e-8
    lr_t = lr * math.sqrt(1 - b2) / (1 - b1)
    for (name, p), g in zip(params.items(), grads, strict=True):
        g = g.double().clamp(-cfg.gradient_threshold, cfg.gradient_threshold)
        g = g * min(1.0, cfg.gradient_norm_threshold / float(g.norm()))
        m, v = (1 - b1) * g, (1 - b2) * g**2
        expect = p.detach().double() - lr_t * m / (v.sqrt() + eps)
        moved = ns["params"][name].detach().double()
        torch.testing.assert_close(moved, expect, rtol=0, atol=1e-2 * lr, msg=name)
        assert (moved - p.detach()).abs().max() <= lr * 1.001  # first Adam step: |change| <= lr
