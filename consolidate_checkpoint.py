"""Write the full `model.safetensors` of a sharded (FSDP) checkpoint, after the run.

    uv run consolidate_checkpoint.py runs/my-run/checkpoints/latest

Sharded checkpoints get it at save time unless train.json sets
`"consolidated_weights": false` (for models whose full weights should not be
gathered on rank 0 during training). This reads the shards on the CPU, with no
GPU and no process group, and adds the file, and its entry in meta.json's
manifest, to the checkpoint; test_smoke.py, test_loss.py, test_ift.py,
convert_gpt2.py and the reference harness then read it as any other checkpoint.
"""

import click

from checkpointing import consolidate_weights
from errors import report_user_errors


@click.command(epilog="""\b
Example:
  uv run consolidate_checkpoint.py runs/my-run/checkpoints/latest""")
@click.argument("checkpoint_dir", type=click.Path(exists=True, file_okay=False))
@report_user_errors
def main(checkpoint_dir):
    """Gather CHECKPOINT_DIR's sharded weights into its model.safetensors."""
    print(f"wrote {consolidate_weights(checkpoint_dir)}")


if __name__ == "__main__":
    main()
