"""The per-layer report: a table and a picture a person reads at a glance (report.md, per_layer.png)."""

from __future__ import annotations

from pathlib import Path

PLOT = "per_layer.png"


def per_layer_markdown(report: dict) -> str:
    result = report["per_layer"]
    first = result["first_divergent_layer"]
    verdict = "PASS" if report["passed"] else "FAIL"
    precision = result.get("precision") or ""
    quantized = (
        f", its weights quantized as the {precision} artifact stores them" if precision in ("fp8", "nvfp4") else ""
    )
    where = (
        "every layer within its bound"
        if first is None
        else f"first divergent layer: **{first}**, block **{result['first_divergent_block']}**"
    )
    lines = [
        f"# dllm-trt validate --per-layer: {verdict}",
        "",
        f"`{report['artifacts']}` ({report['execution']}), {result['dtype']}, against transformers layer by layer on "
        f"{', '.join(result['calls'])}: {where}.",
        "",
        "Every layer of the artifact is given the reference's input to that layer, so each layer's error is its own. "
        + (
            "fp32: max relative error <= 1e-4 per block, every expert pick equal."
            if result["dtype"] == "float32"
            else f"Reduced precision is judged against the envelope, transformers' same layer in {result['dtype']} on "
            f"the same inputs{quantized}: the median and the 90th percentile of the per-token errors each <= "
            f"{result['envelope_multiple']:g} x the envelope's, expert picks differing <= "
            f"{result['envelope_multiple']:g} x the envelope's share plus one token; what a pick feeds is judged "
            "where the pick equals the reference's."
        ),
        f" Judged tokens: {result['judged_tokens']} of {result['tokens']} (a token whose fp32 router pick is tied "
        f"within {result['near_tie_ulps']} ulps is not judged on what the pick feeds).",
        "",
        f"![per-layer error]({PLOT})",
        "",
    ]
    if result["failures"]:
        lines += ["**Failed:**", ""] + [f"- {f}" for f in result["failures"]] + [""]
    lines += [
        "| layer | ok | first failing block | worst block (statistic, worst call) | ours | envelope | bound "
        "| expert picks equal (envelope) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in result["layers"]:
        blocks = layer["blocks"]
        worst = max(blocks, key=_share, default=None)
        if worst is None:
            continue
        envelope = "" if worst["envelope"] is None else f"{worst['envelope']:.2e}"
        agreement = "" if layer["expert_agreement"] is None else f"{100 * layer['expert_agreement']:.1f}%"
        if layer["envelope_expert_agreement"] is not None:
            agreement += f" ({100 * layer['envelope_expert_agreement']:.1f}%)"
        lines.append(
            f"| {layer['layer']} | {'yes' if layer['passed'] else '**NO**'} | {layer['first_failing_block'] or ''} | "
            f"{worst['block']} ({worst.get('statistic', 'max')}, {worst['call']}) | {worst['value']:.2e} | "
            f"{envelope} | {worst['bound']:.2e} | {agreement} |"
        )
    lines.append("")
    return "\n".join(lines)


def _share(block: dict) -> tuple[bool, float]:
    """Failing first, then the largest share of its bound."""
    share = block["value"] / block["bound"] if block["bound"] else (0.0 if block["value"] == 0 else float("inf"))
    return (not block["passed"], share)


def plot_per_layer(report: dict, path: Path) -> None:
    """Three panels over the layers: worst block as a share of its bound, layer-output error, expert picks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = report["per_layer"]
    layers = result["layers"]
    labels = [str(layer["layer"]) for layer in layers]
    x = list(range(len(layers)))
    shares, failed = [], []
    for layer in layers:
        worst = max(layer["blocks"], key=_share, default=None)
        value = 0.0 if worst is None else _share(worst)[1]
        shares.append(max(value, 1e-6))
        failed.append(not layer["passed"])
    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7.5, 7.0), sharex=True)
    top.semilogy(x, shares, "o-", color="tab:blue", label="ours: worst block / its bound")
    top.axhline(1.0, color="tab:red", linestyle=":", label="bound")
    for xi, share, fail, layer in zip(x, shares, failed, layers):
        if fail:
            top.plot(xi, share, "x", color="tab:red", markersize=12, markeredgewidth=2)
            top.annotate(layer["first_failing_block"], (xi, share), textcoords="offset points", xytext=(6, 4),
                         color="tab:red", fontsize=8)  # fmt: skip
    top.set_ylabel("share of bound")
    top.legend(fontsize=8, loc="upper left")
    verdict = "PASS" if report["passed"] else f"FAIL at layer {result['first_divergent_layer']}"
    top.set_title(f"{Path(report['artifacts']).name}: {result['dtype']} vs transformers, per layer ({verdict})",
                  fontsize=10)  # fmt: skip

    ours, envelope = [], []
    for layer in layers:
        outputs = [b for b in layer["blocks"] if b["block"] in ("layer output", "logits", "entropy")]
        ours.append(max([b["value"] for b in outputs], default=float("nan")))
        values = [b["envelope"] for b in outputs if b["envelope"] is not None]
        envelope.append(max(values, default=float("nan")))
    middle.semilogy(x, [max(v, 1e-9) for v in ours], "o-", color="tab:blue", label="ours")
    if any(v == v for v in envelope):  # not all NaN
        middle.semilogy(x, [max(v, 1e-9) for v in envelope], "s--", color="tab:gray",
                        label=f"envelope: transformers in {result['dtype']}")  # fmt: skip
    middle.set_ylabel("layer output error")
    middle.legend(fontsize=8, loc="upper left")

    agreement = [layer["expert_agreement"] for layer in layers]
    envelope_agreement = [layer["envelope_expert_agreement"] for layer in layers]
    bottom.plot([xi for xi, a in zip(x, agreement) if a is not None], [100 * a for a in agreement if a is not None],
                "o-", color="tab:blue", label="ours")  # fmt: skip
    if any(a is not None for a in envelope_agreement):
        shown = [(xi, 100 * a) for xi, a in zip(x, envelope_agreement) if a is not None]
        bottom.plot(*zip(*shown), "s--", color="tab:gray", label="envelope")
    bottom.set_ylabel("expert picks equal, %")
    bottom.set_xticks(x, labels)
    bottom.set_xlabel("layer")
    bottom.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
