"""``python -m prefkd.align vocab-map --teacher T --student S --out FILE``: build MinED's teacher → student
vocabulary map (docs/methods.md §6) and write it as ``{"teacher_id": student_id}`` JSON. T and S are tokenizer folders,
GGUF paths or hub ids (:func:`prefkd.models.loading.load_tokenizer`). The map also lands in the on-disk
cache (``$PREFKD_CACHE/vocab_maps``), where training finds it; ``--rebuild`` ignores a cached copy."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefkd.align", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    vm = sub.add_parser("vocab-map", help="build the MinED teacher → student vocabulary map")
    vm.add_argument("--teacher", required=True, help="teacher tokenizer: folder, GGUF file or hub id")
    vm.add_argument("--student", required=True, help="student tokenizer: folder, GGUF file or hub id")
    vm.add_argument("--out", required=True, help="output JSON file")
    vm.add_argument("--rebuild", action="store_true", help="rebuild even if the cache holds this pair's map")
    vm.add_argument("--no-cache", action="store_true", help="neither read nor write the on-disk cache")
    args = parser.parse_args(argv)

    from prefkd.align.markers import word_start_marker
    from prefkd.align.vocab_map import build_vocab_map, load_or_build_vocab_map, save_vocab_map
    from prefkd.models.loading import ModelLoadError, load_tokenizer

    try:
        teacher, student = load_tokenizer(args.teacher), load_tokenizer(args.student)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    mapping = (build_vocab_map(teacher, student) if args.no_cache
               else load_or_build_vocab_map(teacher, student, rebuild=args.rebuild))
    seconds = time.perf_counter() - start
    path = save_vocab_map(mapping, args.out)
    print(f"vocab map {args.teacher} → {args.student}: {len(mapping)} teacher tokens → "
          f"{len(set(mapping.values()))} distinct student tokens (markers {word_start_marker(teacher)!r} → "
          f"{word_start_marker(student)!r}) in {seconds:.1f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
