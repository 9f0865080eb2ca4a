"""Write model cards: the planned cards of `model_cards/`, or the card of a trained checkpoint.

```bash
python scripts/make_cards.py --planned model_cards/                      # the planned PASCAL-5i / COCO-20i cards
python scripts/make_cards.py --model_dir OUT --results OUT/eval-paper-1shot/results.json \\
    --repo_id gfss-hf/gfss-pascal5i-fold0                                # OUT/README.md, the card of a checkpoint
```

The cards are `gfss_hf.cards.render_model_card` (template `gfss_hf/templates/model_card.md`, recipe from
`scripts/configs/*.yaml`, numbers through `gfss_hf.results.load_results`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gfss_hf.cards import render_model_card, save_model_card, write_planned_cards

logger = logging.getLogger("make_cards")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planned", metavar="DIR", help="write the cards of all planned checkpoints into DIR")
    parser.add_argument("--model_dir", help="a save_pretrained folder whose card to render")
    parser.add_argument("--results", nargs="+", help="results.json file(s) written by scripts/evaluate.py")
    parser.add_argument("--repo_id", help="Hub repo id used in the card's code examples")
    parser.add_argument("--output", help="where to write the card (default: MODEL_DIR/README.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    if bool(args.planned) == bool(args.model_dir):
        parser.error("give exactly one of --planned DIR and --model_dir DIR.")
    if args.planned:
        for path in write_planned_cards(args.planned):
            logger.info(f"wrote {path}")
        return 0
    card = render_model_card(args.model_dir, args.results, repo_id=args.repo_id)
    logger.info(f"wrote {save_model_card(card, args.output or Path(args.model_dir) / 'README.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
