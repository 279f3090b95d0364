"""Draw docs/figures/unroll.png: ProsPr's unrolled inner loop and the meta-gradient that scores it.

Run from anywhere (matplotlib only, no LaTeX needed): ``python docs/figures/make_unroll_figure.py``;
an optional argument writes the image elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parent / "unroll.png"

FORWARD = "#1f4e8c"
BACKWARD = "#c0392b"
BOX = "#eef3fa"
MASK = "#fdf2e3"

# x positions of the chain; y = 0 is the forward row.
NODES = {
    "theta": (0.0, r"$\theta_0$"),
    "w0": (2.7, r"$w_0 = c \odot \theta_0$"),
    "w1": (5.5, r"$w_1$"),
    "w2": (7.6, r"$w_2$"),
    "wM": (10.5, r"$w_M$"),
    "loss": (13.5, r"$L_M = L(w_M;\, b_M)$"),
}
WIDTH = {"theta": 0.9, "w0": 1.9, "w1": 0.8, "w2": 0.8, "wM": 0.8, "loss": 2.5}
HEIGHT = 0.62


def box(ax, x, y, w, text, face, edge, size=15):
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - HEIGHT / 2),
            w,
            HEIGHT,
            boxstyle="round,pad=0.04,rounding_size=0.12",
            facecolor=face,
            edgecolor=edge,
            linewidth=1.6,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, start, end, color, style="-|>", dashed=False, rad=0.0, width=1.8):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=16,
            color=color,
            linewidth=width,
            linestyle=(0, (5, 3)) if dashed else "-",
            connectionstyle=f"arc3,rad={rad}",
            shrinkA=0,
            shrinkB=0,
        )
    )


def right(name):
    return NODES[name][0] + WIDTH[name] / 2


def left(name):
    return NODES[name][0] - WIDTH[name] / 2


def main(out: Path = OUT) -> None:
    fig, ax = plt.subplots(figsize=(14, 5.2))
    ax.set_xlim(-0.7, 14.9)
    ax.set_ylim(-2.75, 1.45)
    ax.axis("off")

    for name, (x, text) in NODES.items():
        box(ax, x, 0.0, WIDTH[name], text, MASK if name == "loss" else BOX, FORWARD)
    ax.text(
        0.0, -0.45, "initial weights\n(what is trained\nunder the mask)", ha="center", va="top", fontsize=10
    )
    ax.text((right("w2") + left("wM")) / 2, 0.0, r"$\cdots$", ha="center", va="center", fontsize=18)

    # Forward: theta_0 masked by c, the unrolled SGD steps, then the loss after step M.
    arrow(ax, (right("theta"), 0.0), (left("w0"), 0.0), FORWARD)
    steps = [
        ("w0", "w1", "step 1\non $b_0$"),
        ("w1", "w2", "step 2\non $b_1$"),
        ("wM", "loss", "loss\non $b_M$"),
    ]
    for a, b, label in steps:
        arrow(ax, (right(a), 0.0), (left(b), 0.0), FORWARD)
        ax.text((right(a) + left(b)) / 2, 0.12, label, ha="center", va="bottom", fontsize=10.5, color=FORWARD)
    arrow(ax, (right("w2"), 0.0), (right("w2") + 0.6, 0.0), FORWARD, style="-")
    arrow(ax, (left("wM") - 0.6, 0.0), (left("wM"), 0.0), FORWARD)
    ax.text(
        (right("w2") + left("wM")) / 2,
        0.12,
        "steps\n$3 \\ldots M$",
        ha="center",
        va="bottom",
        fontsize=10.5,
        color=FORWARD,
    )
    ax.text(
        (left("w0") + right("loss")) / 2,
        1.15,
        r"forward: $M$ SGD steps (lr $\alpha$, momentum $\mu$, weight decay $\lambda$) on every trainable "
        r"parameter, BatchNorm in train mode",
        ha="center",
        va="center",
        fontsize=11.5,
        color=FORWARD,
    )

    # The mask c = 1 enters w0; the meta-gradient comes back to it.
    cx, cy = NODES["w0"][0], -1.55
    box(ax, cx, cy, 1.1, r"$c = \mathbf{1}$", MASK, BACKWARD)
    arrow(ax, (cx - 0.3, cy + HEIGHT / 2), (cx - 0.3, -HEIGHT / 2), FORWARD)

    # Backward: the meta-gradient flows from L_M back through every step to the mask.
    yb = -0.55
    back = [
        ("loss", "wM", r"$\nabla_w L(w_M; b_M)$"),
        ("w2", "w1", r"$\partial w_2 / \partial w_1$"),
        ("w1", "w0", r"$\partial w_1 / \partial w_0$"),
    ]
    for a, b, label in back:
        arrow(ax, (left(a), yb), (right(b), yb), BACKWARD, dashed=True)
        ax.text(
            (left(a) + right(b)) / 2, yb - 0.1, label, ha="center", va="top", fontsize=10.5, color=BACKWARD
        )
    arrow(ax, (left("wM"), yb), (right("w2"), yb), BACKWARD, dashed=True)
    arrow(ax, (cx + 0.3, -HEIGHT / 2), (cx + 0.3, cy + HEIGHT / 2), BACKWARD, dashed=True)
    ax.text(cx + 0.42, -0.95, r"$\theta_0 \odot$", ha="left", va="center", fontsize=11, color=BACKWARD)
    ax.text(
        8.4,
        -1.5,
        "backward: the meta-gradient $\\partial L_M / \\partial c$, through all $M$ steps\n"
        "(Hessian-vector products; first-order mode takes every $\\partial w_{t+1} / \\partial w_t = I$)",
        ha="center",
        va="center",
        fontsize=11.5,
        color=BACKWARD,
    )
    ax.text(
        7.1,
        -2.45,
        r"score $s = \left|\partial L_M / \partial c\right|$ at $c = \mathbf{1}$:  "
        r"keep the global top $1 - \mathrm{sparsity}$, then train $\theta_0$ under that mask",
        ha="center",
        va="center",
        fontsize=12.5,
    )

    fig.savefig(out, dpi=110, bbox_inches="tight", facecolor="white")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
