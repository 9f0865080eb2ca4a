"""Publish a trained GFSS checkpoint on the Hugging Face Hub: model + image processor + the code that loads them
(`trust_remote_code=True`) + the `few-shot-segmentation` pipeline + a model card with `model-index` results.

The output folder of training is never uploaded as is: the script stages a clean export (only what a Hub repository
needs, no optimiser states or logs), checks it, and uploads the staged folder.

Usage:

```bash
# check offline what would be pushed (this is what the tests run)
python scripts/push_to_hub.py --model_dir outputs/pascal5i-fold0 --repo_id gfss-hf/gfss-pascal5i-fold0 \\
    --results outputs/pascal5i-fold0/eval-paper-1shot/results.json outputs/pascal5i-fold0/eval-paper-5shot/results.json \\
    --dry_run
# push (needs a token with write access: `hf auth login` or --token): the same without --dry_run
```

The staging, the checks (`--dry_run` runs them and stops; a real push runs them first and refuses to upload a
folder that fails) and the upload are `gfss_hf.hub.publish`, the same path as `pretrain(push_to_hub=True)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from gfss_hf.hub import (  # noqa: F401  (the checks are re-exported for callers of this script)
    DEFAULT_COMMIT_MESSAGE,
    ExportCheckError,
    check_card,
    check_export,
    check_files,
    check_remote_code,
    publish,
    push_folder,
    stage_export,
)

logger = logging.getLogger("push_to_hub")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="save_pretrained folder written by scripts/pretrain.py")
    parser.add_argument("--repo_id", required=True, help="Hub repository, e.g. gfss-hf/gfss-pascal5i-fold0")
    parser.add_argument("--results", nargs="+", help="results.json file(s) of scripts/evaluate.py (the model-index)")
    parser.add_argument("--dry_run", action="store_true", help="stage and check offline; upload nothing")
    parser.add_argument("--staging_dir", help="where to stage the export (default: a temporary folder)")
    parser.add_argument("--no_pipeline", action="store_true", help="export model + processor without the pipeline")
    parser.add_argument("--check_steps", type=int, default=2, help="adaptation steps of the pipeline check")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.add_argument("--commit_message", default=DEFAULT_COMMIT_MESSAGE)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    for path in args.results or []:
        if not os.path.isfile(path):
            parser.error(f"--results {path!r} does not exist; run scripts/evaluate.py first or omit it.")

    try:
        report = publish(
            args.model_dir,
            args.repo_id,
            args.results,
            token=args.token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            with_pipeline=not args.no_pipeline,
            check_steps=args.check_steps,
            staging_dir=args.staging_dir,
            dry_run=args.dry_run,
        )
    except ExportCheckError as err:
        logger.error(f"export check failed: {err}")
        return 1
    logger.info("export check passed: " + json.dumps(report, default=str))
    if args.dry_run:
        kept = f"; the export is in {args.staging_dir}" if args.staging_dir else ""
        logger.info(f"dry run: nothing pushed{kept}")
    else:
        logger.info(f"pushed {args.repo_id}: {report['commit_url']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
