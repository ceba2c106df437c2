"""Point-BERT encoder with colour: FPS -> kNN groups -> mini-PointNet -> transformer.

Parameter names follow the GPT4Point / ULIP-2 layout (see CHECKPOINTS.md), so their weights load as
they are. The 6 tokenizer channels are (xyz relative to the group centre, rgb) by default;
``channel_layout: gpt4point`` reproduces GPT4Point's released features (relative xyz, absolute xyz),
which never saw colour, for its checkpoints only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from timm.models.vision_transformer import Block

from lavis_point.models.checkpoint import (
    CheckpointError,
    load_state_dict_checked,
    read_checkpoint,
    select_prefix,
    state_dict_of,
)
from lavis_point.models.grouping import group_points
from lavis_point.paths import config_path

CHANNEL_LAYOUTS = ("xyz_rgb", "gpt4point")


def pointwise(conv, x):
    """A 1x1 ``Conv1d`` applied to channels-last rows (..., C_in) -> (..., C_out), as one matmul."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


class MiniPointNet(nn.Module):
    """Each group of k points -> one feature: shared MLP, max-pool, concat, shared MLP, max-pool.

    The modules are 1x1 ``Conv1d`` as in the released checkpoints, but the forward runs them as
    matmuls on channels-last rows, and splits the second MLP's first layer over the concat
    [group max, point feature]: the group max's half is computed once per group, not once per point.
    Same result up to float rounding (tests/test_point_bert.py); ~40% less time, no concat tensor.
    """

    def __init__(self, in_channels=6, dims=(128, 256, 512), out_dim=256):
        super().__init__()
        h1, h2, h3 = dims
        self.first_conv = nn.Sequential(
            nn.Conv1d(in_channels, h1, 1), nn.BatchNorm1d(h1), nn.ReLU(inplace=True), nn.Conv1d(h1, h2, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(2 * h2, h3, 1), nn.BatchNorm1d(h3), nn.ReLU(inplace=True), nn.Conv1d(h3, out_dim, 1)
        )

    def forward(self, groups):  # (B, G, k, C)
        batch, num_groups, k, channels = groups.shape
        conv1, norm1, _, conv2 = self.first_conv
        conv3, norm2, _, conv4 = self.second_conv
        x = groups.reshape(batch * num_groups * k, channels)
        f = pointwise(conv2, F.relu(norm1(pointwise(conv1, x))))  # (BGk, h2)
        f = f.reshape(batch * num_groups, k, -1)
        pooled = f.max(dim=1).values  # (BG, h2)
        # conv3 of cat([pooled, f]) = W[:, :h2] @ pooled + W[:, h2:] @ f
        h2 = f.shape[-1]
        w3 = conv3.weight.squeeze(-1)
        f = F.linear(f, w3[:, h2:]) + F.linear(pooled, w3[:, :h2], conv3.bias).unsqueeze(1)
        f = pointwise(conv4, F.relu(norm2(f.reshape(batch * num_groups * k, -1))))
        return f.reshape(batch * num_groups, k, -1).max(dim=1).values.reshape(batch, num_groups, -1)


def conv_forward(net, groups):
    """``MiniPointNet`` as its modules are written (Conv1d on (BG, C, k), max-pool, concat, Conv1d): the
    reference its forward is tested and benchmarked against."""
    batch, num_groups, k, channels = groups.shape
    f = net.first_conv(groups.reshape(batch * num_groups, k, channels).transpose(1, 2))
    f = torch.cat([f.max(dim=2, keepdim=True).values.expand(-1, -1, k), f], dim=1)
    return net.second_conv(f).max(dim=2).values.reshape(batch, num_groups, -1)


class TransformerBlocks(nn.Module):
    """Blocks that take ``x + pos`` at every block, as Point-BERT does."""

    def __init__(self, width, depth, num_heads, mlp_ratio, drop_path_rate):
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, drop_path=r) for r in rates
        )

    def forward(self, x, pos):
        for block in self.blocks:
            x = block(x + pos)
        return x


@registry.register_model("point_bert")
class PointBertEncoder(BaseModel):
    """(B, N, 6) points (xyz, rgb in [-1, 1]) -> (B, num_groups, width) point tokens."""

    weights_from = None  # the file its weights were last loaded from (None: random initialisation)

    PRETRAINED_MODEL_CONFIG_DICT = {
        "gpt4point": config_path("models/point_bert_gpt4point.yaml"),
        "ulip2": config_path("models/point_bert_ulip2.yaml"),
        "tiny": config_path("models/point_bert_tiny.yaml"),
    }

    def __init__(
        self,
        num_groups=512,
        group_size=32,
        width=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        drop_path_rate=0.1,
        pointnet_dims=(128, 256, 512),
        encoder_dims=256,
        channel_layout="xyz_rgb",
        relative_xyz_scale=1.0,
    ):
        super().__init__()
        if channel_layout not in CHANNEL_LAYOUTS:
            raise ValueError(f"channel_layout must be one of {CHANNEL_LAYOUTS}, got {channel_layout!r}")
        self.num_groups, self.group_size, self.width = num_groups, group_size, width
        self.channel_layout = channel_layout
        # Relative xyz inside a small group spans ~0.1 while rgb spans [-1, 1]: scaling xyz up keeps
        # geometry from drowning in colour at the tokenizer's first layer. 1.0 for released weights.
        self.relative_xyz_scale = relative_xyz_scale
        self.encoder = MiniPointNet(6, tuple(pointnet_dims), encoder_dims)
        self.reduce_dim = nn.Linear(encoder_dims, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
        self.blocks = TransformerBlocks(width, depth, num_heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(width)

    @classmethod
    def from_config(cls, cfg):
        keys = ("num_groups", "group_size", "width", "depth", "num_heads", "mlp_ratio", "drop_path_rate",
                "pointnet_dims", "encoder_dims", "channel_layout", "relative_xyz_scale")
        model = cls(**{k: cfg[k] for k in keys if cfg.get(k) is not None})
        if cfg.get("checkpoint"):
            model.load_checkpoint(cfg.checkpoint)
        return model

    def forward(self, points):
        if points.dim() != 3 or points.shape[-1] != 6:
            raise ValueError(f"point_bert expects points of shape (B, N, 6), got {tuple(points.shape)}")
        groups, centres = group_points(points, self.num_groups, self.group_size)  # (B, G, k, 6), (B, G, 3)
        relative, other = groups[..., :3], groups[..., 3:]
        if self.channel_layout == "gpt4point":
            # GPT4Point builds (relative xyz, absolute xyz): rgb is dropped. Kept only to reproduce it.
            other = relative + centres.unsqueeze(2)
        groups = torch.cat([relative * self.relative_xyz_scale, other], dim=-1)
        tokens = self.reduce_dim(self.encoder(groups))  # (B, G, width)
        pos = self.pos_embed(centres)
        batch = points.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)  # (B, 1+G, width)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), pos], dim=1)
        x = self.norm(self.blocks(x, pos))
        return x[:, 1:]  # drop CLS: (B, G, width)

    def extract_features(self, samples):
        """LAVIS-style feature extraction: {"point": (B, N, 6)} -> {"point_tokens": (B, G, width)}."""
        return {"point_tokens": self(samples["point"])}

    def load_checkpoint(self, url_or_filename):
        """Point-BERT weights in the GPT4Point or ULIP-2 layout: bare, under "model"/"state_dict",
        with or without a ``module.`` / ``point_encoder.`` prefix (so a whole stage-1 file works)."""
        state = state_dict_of(read_checkpoint(url_or_filename), url_or_filename)
        if not any(k.startswith("point_encoder.") for k in state) and any(
                k.startswith(("Qformer.", "query_tokens")) for k in state):
            raise CheckpointError(
                f"{url_or_filename}: a GPT4Point/LAVIS model file with no point encoder weights (Q-Former keys "
                f"but no point_encoder.*: its runner left the frozen encoder out). Give point_bert a file that "
                f"holds the encoder: ULIP-2's Point-BERT (load_model('point_bert', 'ulip2', checkpoint=PATH)), "
                f"or a whole file that has point_encoder.* keys")
        state = select_prefix(state, "point_encoder.")
        summary = load_state_dict_checked(self, state, source=url_or_filename, frozen_may_be_absent=False)
        self.weights_from = url_or_filename
        return summary
