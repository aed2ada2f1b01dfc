r"""The main job: python -m scripts.main_job --workdir=runs/main [--config.a.b=v].

Trains, prunes, quantizes, evaluates and decodes on the embedded defaults; see
scripts/configs/main_job.py. Re-running resumes training from --workdir.
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, main_job_lib, train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "scripts/configs/main_job.py", "Main-job config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/main", "Output folder.")


def main():
  report = main_job_lib.run(_CONFIG.value, _WORKDIR.value)
  print(main_job_lib.format_report(report, _CONFIG.value))


if __name__ == "__main__":
  cli_lib.run(main, errors=(train_lib.NonFiniteLossError,))
