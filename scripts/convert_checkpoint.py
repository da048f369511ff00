"""Convert DINO weights between formats; the converted network computes the same numbers.

    python scripts/convert_checkpoint.py --from {vit,timm,dino} SRC --to {dino,vit,timm} DST

Sources: `vit` a transformers ViT folder or weights file (facebook/dino-vits16, ...); `timm` a timm
folder or weights file (vit_small_patch16_224.dino, ...); `dino` a checkpoint of the reference
implementation (a training checkpoint.pth, teacher unless --student, or a backbone-only .pth), or a
dino_hf folder. Targets: `dino` a DinoModel folder (with the projection head, when the source has one,
as dino_head.safetensors + dino_head_config.json), `vit` a transformers ViTModel folder that loads
without dino_hf, `timm` a timm folder that loads in timm and in transformers' TimmWrapperModel.

Example:
    python scripts/convert_checkpoint.py --from dino checkpoint.pth --to dino outputs/vits16
"""

import sys

from dino_hf.command_line import ScriptArgumentParser, run_script
from dino_hf.convert.conversions import convert_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = ScriptArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from", dest="source_format", choices=("vit", "timm", "dino"), required=True, help="format of SRC"
    )
    parser.add_argument("source", metavar="SRC", help="folder or weights file to read")
    parser.add_argument(
        "--to", dest="target_format", choices=("dino", "vit", "timm"), required=True, help="format of DST"
    )
    parser.add_argument("target", metavar="DST", help="folder to write")
    parser.add_argument(
        "--student", action="store_true", help="take the student of a reference checkpoint, not the teacher"
    )
    parser.add_argument(
        "--num-attention-heads", type=int, help="heads per block, when not hidden_size // 64 as in DINO's ViTs"
    )
    args = parser.parse_intermixed_args(argv)

    overrides = {} if args.num_attention_heads is None else {"num_attention_heads": args.num_attention_heads}
    imported = convert_checkpoint(
        args.source_format, args.source, args.target_format, args.target, use_student=args.student, **overrides
    )
    config = imported.model.config
    print(
        f"wrote {args.target} ({args.target_format}): ViT hidden {config.hidden_size}, {config.num_hidden_layers} "
        f"blocks, {config.num_attention_heads} heads, patch {config.patch_size}, image {config.image_size}"
    )
    if imported.head_state_dict is not None:
        kept = "saved as dino_head.safetensors" if args.target_format == "dino" else "not exported (use --to dino)"
        print(f"projection head {imported.head_config}: {kept}")


if __name__ == "__main__":
    sys.exit(run_script(main, "convert_checkpoint.py"))
