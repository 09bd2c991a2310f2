"""Feature maps `phi` that turn softmax attention into linear attention, one class per paper.

Every map takes a tensor `x` of shape `(B, H, ..., d)` whose dimension 1 is the key/value head (queries of a
grouped-query attention carry their group as an extra dimension after it) and returns `(B, H, ..., f)`.
Learned maps hold one projection per key/value head, shared by that head's keys and by all query heads of its
group: the recurrent state then has one `(S, z)` per key/value head, as a GQA KV cache has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ProjectedFeatureMap(nn.Module):
    """Shared part of the learned maps: `W x + b` with one `W` (`k x d`) and `b` (`k`) per head."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, feature_dim, head_dim))
        self.bias = nn.Parameter(torch.empty(num_heads, feature_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random (semi-)orthogonal rows of unit norm per head, zero bias.

        Orthogonal rows keep `phi(q) . phi(k)` on the scale of `q . k`, so denominators start far above `eps`,
        and distinct rows see distinct directions of the head (a random-feature start, as in T2R).
        """
        for head in self.weight:
            nn.init.orthogonal_(head)
        self.bias.zero_()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """`W x + b` per head: `(B, H, ..., d) -> (B, H, ..., k)`."""
        extra = x.dim() - 3  # dims between the head and the feature dim (group, time)
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype).view(self.num_heads, *([1] * (extra - 1)), 1, self.feature_dim)
        return torch.einsum("bh...d,hkd->bh...k", x, weight) + bias

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"


class T2RFeatureMap(_ProjectedFeatureMap):
    """`phi(x) = ReLU(W x + b)` — T2R, Kasai et al. 2021, *Finetuning Pretrained Transformers into RNNs*."""

    @property
    def output_dim(self) -> int:
        """Number of features per head."""
        return self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.project(x))


class HedgehogFeatureMap(_ProjectedFeatureMap):
    """`phi(x) = [softmax(W x + b), softmax(-(W x + b))]` — Hedgehog, Zhang et al. 2024, *The Hedgehog & the
    Porcupine: Expressive Linear Attentions with Softmax Mimicry*. Softmax is taken in fp32."""

    @property
    def output_dim(self) -> int:
        """Number of features per head (twice the projection size)."""
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.project(x).float()
        return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1).to(x.dtype)


class EluFeatureMap(nn.Module):
    """`phi(x) = elu(x) + 1` — Katharopoulos et al. 2020, *Transformers are RNNs*. No parameters."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim

    @property
    def output_dim(self) -> int:
        """Number of features per head (the head dimension)."""
        return self.head_dim

    def reset_parameters(self) -> None:
        """Nothing to initialise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1


class WindowFactor(nn.Module):
    """The learned weight `g = sigmoid(w_h)` of the softmax window against the linear part, one per query head
    (LoLCATs' window factor; see `ops.py` for the hybrid's exact form).

    `w` starts at `log(1/9)` (`g = 0.1`), LoLCATs' initial value, and is trained with the feature maps during
    attention transfer."""

    INITIAL_LOGIT = -2.1972245773362196  # sigmoid(INITIAL_LOGIT) = 0.1

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.logit = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every head at `g = 0.1`."""
        self.logit.fill_(self.INITIAL_LOGIT)

    def forward(self) -> torch.Tensor:
        """`g` per query head, `(num_heads,)`, in fp32."""
        return torch.sigmoid(self.logit.float())

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


FEATURE_MAP_CLASSES: dict[str, type[nn.Module]] = {
    "t2r": T2RFeatureMap,
    "elu": EluFeatureMap,
    "hedgehog": HedgehogFeatureMap,
}


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int) -> nn.Module:
    """Instantiate the feature map called `name` for `num_heads` key/value heads of size `head_dim`."""
    if name not in FEATURE_MAP_CLASSES:
        raise ValueError(f"Unknown feature map {name!r}; choose one of {sorted(FEATURE_MAP_CLASSES)}.")
    return FEATURE_MAP_CLASSES[name](num_heads, head_dim, feature_dim)
