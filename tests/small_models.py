"""Very small stage-1 / stage-2 models for fast unit tests (same code paths as every config)."""
from lavis_point.models.point_opt import PointOPT
from lavis_point.models.point_qformer import PointQFormer

ENCODER = dict(model_type="tiny", num_groups=8, group_size=8, width=32, depth=1, num_heads=4,
               pointnet_dims=[16, 16, 32], encoder_dims=16)
QFORMER = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=24, dropout=0.0)
OPT = dict(hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
           max_position_embeddings=64, dropout=0.0)


def small_stage1(**kw):
    args = dict(embed_dim=16, point_encoder_cfg=ENCODER, qformer_cfg=QFORMER, num_query_token=4)
    args.update(kw)
    return PointQFormer(**args)


def small_stage2(**kw):
    args = dict(opt_config=OPT, opt_tokenizer="asset:tiny_opt_tokenizer", freeze_opt=False,
                prompt="a 3D point cloud of ", point_encoder_cfg=ENCODER, qformer_cfg=QFORMER, num_query_token=4)
    args.update(kw)
    return PointOPT(**args)
