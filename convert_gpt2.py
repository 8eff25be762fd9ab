"""Convert GPT-2 and Llama weights between Hugging Face transformers and this project
(the conversion itself is hf_convert.py's).

    uv run convert_gpt2.py from-hf openai-community/gpt2 converted/gpt2
    uv run convert_gpt2.py from-hf path/to/a-llama-checkpoint converted/my-llama
    uv run convert_gpt2.py to-hf my-run hf/my-run          # its best checkpoint, else its latest
    uv run convert_gpt2.py to-hf my-run latest hf/my-run --license mit

See hf_convert.py for what each direction writes and how the layouts differ.
"""

from pathlib import Path

import click
from huggingface_hub import HfApi

from errors import report_user_errors
from eval_common import tokenizer_options
from hf_convert import convert_from_hf, convert_to_hf
from model_source import GRAMMAR, model_arguments, resolve_model


# ---------------------------------------------------------------- the CLI

@click.group(epilog="""\b
Examples:
  uv run convert_gpt2.py from-hf openai-community/gpt2 converted/gpt2
  uv run convert_gpt2.py to-hf my-run hf/my-run""")
def cli():
    """Convert GPT-2 and Llama weights between Hugging Face transformers and gpt.py."""


@cli.command("from-hf", epilog="""\b
Example:
  uv run convert_gpt2.py from-hf openai-community/gpt2 converted/gpt2""")
@click.argument("hf_dir_or_repo")
@click.argument("out_dir")
@report_user_errors
def from_hf(hf_dir_or_repo, out_dir):
    """HF_DIR_OR_REPO (a GPT2LMHeadModel or LlamaForCausalLM directory or Hub repo id,
    e.g. openai-community/gpt2) -> OUT_DIR/model.json + OUT_DIR/model.safetensors."""
    cfg = convert_from_hf(hf_dir_or_repo, Path(out_dir))
    print(f"wrote {Path(out_dir) / 'model.json'} and {Path(out_dir) / 'model.safetensors'} "
          f"({cfg.n_layers} layers, emb_dim {cfg.emb_dim}, context {cfg.context_length})")


@cli.command("to-hf", epilog=f"""{GRAMMAR}

\b
Example:
  uv run convert_gpt2.py to-hf my-run best hf/my-run --license mit""")
@model_arguments
@click.argument("out_dir")
@click.option("--license", "license_id", default=None,
              help="The model card's license, as the Hub names licenses (mit, apache-2.0, ...). Default: none.")
@click.option("--push-to-hub", "repo_id", default=None,
              help="Also upload OUT_DIR to this Hub model repo (created if needed; uses your "
                   "`hf auth login` token or HF_TOKEN).")
@tokenizer_options
@report_user_errors
def to_hf(model_args, out_dir, license_id, repo_id, tokenizer_name, datasets_dir):
    """The model -> OUT_DIR loadable by transformers' from_pretrained, with a model card:
    as LlamaForCausalLM when the model is Llama-shaped (pos_emb "rope", norm "rmsnorm",
    mlp "swiglu"), as GPT2LMHeadModel when it is GPT-2-shaped (the defaults; mlp "gelu" or "relu2")."""
    out_dir = Path(out_dir)
    convert_to_hf(resolve_model(model_args), out_dir, tokenizer_name, datasets_dir, repo_id, license_id)
    print(f"wrote {out_dir}")
    if repo_id:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=out_dir,
                          commit_message="Upload model converted by convert_gpt2.py")
        print(f"uploaded to https://huggingface.co/{repo_id}")


if __name__ == "__main__":
    cli()
