"""Public checkpoint layouts (names and shapes), written out from CHECKPOINTS.md, to build files
in those layouts with random values and to check that our modules reproduce them."""


def point_encoder_layout(depth=12, width=384):
    layout = {
        "cls_token": (1, 1, width), "cls_pos": (1, 1, width),
        "encoder.first_conv.0.weight": (128, 6, 1), "encoder.first_conv.0.bias": (128,),
        "encoder.first_conv.1.weight": (128,), "encoder.first_conv.1.bias": (128,),
        "encoder.first_conv.1.running_mean": (128,), "encoder.first_conv.1.running_var": (128,),
        "encoder.first_conv.1.num_batches_tracked": (),
        "encoder.first_conv.3.weight": (256, 128, 1), "encoder.first_conv.3.bias": (256,),
        "encoder.second_conv.0.weight": (512, 512, 1), "encoder.second_conv.0.bias": (512,),
        "encoder.second_conv.1.weight": (512,), "encoder.second_conv.1.bias": (512,),
        "encoder.second_conv.1.running_mean": (512,), "encoder.second_conv.1.running_var": (512,),
        "encoder.second_conv.1.num_batches_tracked": (),
        "encoder.second_conv.3.weight": (256, 512, 1), "encoder.second_conv.3.bias": (256,),
        "reduce_dim.weight": (width, 256), "reduce_dim.bias": (width,),
        "pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
        "pos_embed.2.weight": (width, 128), "pos_embed.2.bias": (width,),
        "norm.weight": (width,), "norm.bias": (width,),
    }
    for i in range(depth):
        p = f"blocks.blocks.{i}."
        layout.update({
            p + "norm1.weight": (width,), p + "norm1.bias": (width,),
            p + "norm2.weight": (width,), p + "norm2.bias": (width,),
            p + "mlp.fc1.weight": (4 * width, width), p + "mlp.fc1.bias": (4 * width,),
            p + "mlp.fc2.weight": (width, 4 * width), p + "mlp.fc2.bias": (width,),
            p + "attn.qkv.weight": (3 * width, width),
            p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
        })
    return layout


def qformer_layout(num_layers=12, hidden=768, inter=3072, encoder_width=1408, vocab=30523, cross_freq=2,
                   query_only=False):
    """LAVIS BLIP-2 ``Qformer.*`` names (without the prefix). ``query_only``: GPT4Point stage 2."""
    h = hidden
    layout = {"bert.embeddings.LayerNorm.weight": (h,), "bert.embeddings.LayerNorm.bias": (h,)}
    if not query_only:
        layout.update({
            "bert.embeddings.position_ids": (1, 512),
            "bert.embeddings.word_embeddings.weight": (vocab, h),
            "bert.embeddings.position_embeddings.weight": (512, h),
            "cls.predictions.bias": (vocab,),
            "cls.predictions.transform.dense.weight": (h, h), "cls.predictions.transform.dense.bias": (h,),
            "cls.predictions.transform.LayerNorm.weight": (h,), "cls.predictions.transform.LayerNorm.bias": (h,),
            "cls.predictions.decoder.weight": (vocab, h), "cls.predictions.decoder.bias": (vocab,),
        })
    for i in range(num_layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            layout[p + f"attention.self.{name}.weight"] = (h, h)
            layout[p + f"attention.self.{name}.bias"] = (h,)
        layout.update({
            p + "attention.output.dense.weight": (h, h), p + "attention.output.dense.bias": (h,),
            p + "attention.output.LayerNorm.weight": (h,), p + "attention.output.LayerNorm.bias": (h,),
        })
        if i % cross_freq == 0:
            layout.update({
                p + "crossattention.self.query.weight": (h, h), p + "crossattention.self.query.bias": (h,),
                p + "crossattention.self.key.weight": (h, encoder_width), p + "crossattention.self.key.bias": (h,),
                p + "crossattention.self.value.weight": (h, encoder_width), p + "crossattention.self.value.bias": (h,),
                p + "crossattention.output.dense.weight": (h, h), p + "crossattention.output.dense.bias": (h,),
                p + "crossattention.output.LayerNorm.weight": (h,), p + "crossattention.output.LayerNorm.bias": (h,),
            })
        branches = ("_query",) if query_only else ("", "_query")
        for b in branches:
            layout.update({
                p + f"intermediate{b}.dense.weight": (inter, h), p + f"intermediate{b}.dense.bias": (inter,),
                p + f"output{b}.dense.weight": (h, inter), p + f"output{b}.dense.bias": (h,),
                p + f"output{b}.LayerNorm.weight": (h,), p + f"output{b}.LayerNorm.bias": (h,),
            })
    return layout


def shapes_of(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}
