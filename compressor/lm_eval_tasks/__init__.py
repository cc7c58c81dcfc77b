"""lm-evaluation-harness tasks over the fetched evaluation data, with the project's dev/test
splits and scorers (see utils.py). They ship with the package; point lm-eval at this folder:

    lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True \\
        --include_path "$(compressor tasks-path)" --tasks basis_humaneval --confirm_run_unsafe_code

Tasks: basis_humaneval, basis_gsm8k (test split; *_dev for dev), basis_ppl_code,
basis_ppl_math, basis_ppl_general (test split). `compressor eval` runs the same tasks in process.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TASKS_VERSION = 1  # part of the benchmark cache key: raise it when a task's prompts or scoring change
