"""The user's own guide (How to Train, sections 2 to 9) must work exactly as written: its commands, copied here
verbatim, parse, and mean what the guide says they mean."""
import dataclasses
import shlex

import convert_to_llama
import standalone_transformer_lm as lm
import test_llama_model
from conftest import assert_user_error, run_main

PREP = """python standalone_transformer_lm.py prep \\
  --text_path corpus.txt \\
  --out_dir ./data \\
  --vocab_size 32000"""

TRAIN = """python standalone_transformer_lm.py train \\
  --out_dir ./runs/lm138 \\
  --data_dir ./data \\
  --seq_len 1024 \\
  --batch_size 16 \\
  --grad_accum_steps 4 \\
  --n_layer 12 --n_head 12 --d_model 768 --ffn_mult 4 \\
  --max_steps 200000 --warmup_steps 2000 --lr 6e-4 \\
  --weight_decay 0.1 --dropout 0.0 --compile 1"""

TORCHRUN = """torchrun --nproc_per_node=2 standalone_transformer_lm.py train \\
  --out_dir ./runs/lm138_ddp \\
  --data_dir ./data \\
  --seq_len 1024 \\
  --batch_size 16 \\
  --grad_accum_steps 2 \\
  --n_layer 12 --n_head 12 --d_model 768 --ffn_mult 4 \\
  --max_steps 200000 --warmup_steps 2000 --lr 6e-4 \\
  --weight_decay 0.1 --dropout 0.0 --compile 1"""

RESUME = """python standalone_transformer_lm.py train \\
  --out_dir ./runs/lm138 \\
  --data_dir ./data \\
  --seq_len 1024 \\
  --batch_size 16 --grad_accum_steps 4 \\
  --n_layer 12 --n_head 12 --d_model 768 --ffn_mult 4 \\
  --max_steps 300000 --warmup_steps 2000 --lr 6e-4 \\
  --weight_decay 0.1 --dropout 0.1 --compile 1"""

GENERATE = """python standalone_transformer_lm.py generate \\
  --ckpt ./runs/lm138/ckpt_last.pt \\
  --spm ./data/tokenizer.model \\
  --prompt "The sun is" \\
  --max_new_tokens 50"""

CONVERT = """python convert_to_llama.py \\
  --ckpt ./runs/lm138/ckpt_last.pt \\
  --spm ./data/tokenizer.model \\
  --out ./RSCaLM-138M-LLaMA"""


def argv(command: str, script: str) -> list[str]:
    """The arguments that the shell passes to the script."""
    words = shlex.split(command.replace("\\\n", " "))  # as the shell reads it: lines joined, quotes gone
    return words[words.index(script) + 1:]


def parse(command: str):
    return lm.build_parser().parse_args(argv(command, "standalone_transformer_lm.py"))


def test_the_guides_training_commands_are_the_138m_model_and_the_tokens_per_step_it_states():
    preset = lm.ModelConfig(**lm.PRESETS["138m"], vocab_size=32000)
    for command, accum in ((TRAIN, 4), (TORCHRUN, 2), (RESUME, 4)):
        args = parse(command)
        assert lm.resolve_model_config(args, 32000, None) == preset
        assert (args.batch_size, args.grad_accum_steps, args.compile, args.lr) == (16, accum, 1, 6e-4)
        assert args.batch_size * preset.seq_len * args.grad_accum_steps == 16 * 1024 * accum  # "effective tokens"
    # Section 6's command continues section 4's run: its model is the saved one, and what it changes (max_steps,
    # dropout) is accepted
    saved = dataclasses.asdict(lm.resolve_model_config(parse(TRAIN), 32000, None))
    args = parse(RESUME)
    assert lm.resolve_model_config(args, 32000, saved) == preset
    assert (args.out_dir, args.max_steps, args.dropout) == ("./runs/lm138", 300000, 0.1)


def test_the_guides_prep_and_generate_commands():
    args = parse(PREP)
    assert (args.func, args.text_path, args.out_dir, args.vocab_size) == (lm.cmd_prep, "corpus.txt", "./data", 32000)
    args = parse(GENERATE)
    assert (args.func, args.ckpt, args.spm) == (lm.cmd_generate, "./runs/lm138/ckpt_last.pt", "./data/tokenizer.model")
    assert (args.prompt, args.max_new_tokens) == ("The sun is", 50)


def test_the_guides_convert_command_and_the_folder_that_test_llama_model_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./runs here: the flags parse, then the missing checkpoint is the one error
    proc = run_main(*argv(CONVERT, "convert_to_llama.py"), main=convert_to_llama.main)
    assert_user_error(proc, "'./runs/lm138/ckpt_last.pt' does not exist")
    # `python test_llama_model.py  # loads from ./RSCaLM-138M-LLaMA`: no argument, the folder convert wrote
    proc = run_main(main=test_llama_model.main)
    assert_user_error(proc, "'./RSCaLM-138M-LLaMA' is not a converted model folder", "convert_to_llama.py")
