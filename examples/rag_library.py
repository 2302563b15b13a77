"""RAG over a video library: index a folder, retrieve the moments a query names, answer from them.

    python examples/rag_library.py videos/ --query "a dog catches a frisbee" --question "What colour is the dog?"
    python examples/rag_library.py --tiny     # offline: tiny random models, a generated folder of clips

Retrieval uses the CLIP guide's frame embeddings (a FAISS index); each retrieved moment is
described by the answerer from its own frames, and the question is answered about the best
moment's video, with the frames, times and regions the answer rests on.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from freevllm_tools import FreeVideoLLM, VideoLibrary
from freevllm_tools.integrations.langchain import FreeVideoRetriever
from freevllm_tools.testing import tiny_free_video_llm, write_video


def load(args: argparse.Namespace, workdir: Path) -> FreeVideoLLM:
    if args.tiny:  # random weights: the wiring runs, the answers are gibberish
        return tiny_free_video_llm(cache_dir=workdir / "cache")
    return FreeVideoLLM.from_pretrained(llm=args.llm, device=args.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="a folder of videos (default: three generated clips)")
    parser.add_argument("--query", default="a yellow square near the right edge")
    parser.add_argument("--question", default="What is the square doing?")
    parser.add_argument("-k", type=int, default=3, help="moments to retrieve")
    parser.add_argument("--library", default=None, help="library folder (default: a temporary one)")
    parser.add_argument("--llm", default="llava-hf/llava-v1.6-vicuna-7b-hf")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny random models, offline")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folder = Path(args.folder) if args.folder else workdir / "videos"
        if not args.folder:
            folder.mkdir()
            for seed in range(3):
                write_video(folder / f"clip{seed}.mp4", num_frames=40, seed=seed)
        qa = load(args, workdir)

        # 1. Index: one CLIP embedding per sampled frame, shared with qa's feature cache.
        library = VideoLibrary(args.library or workdir / "library", qa.guide, cache=qa.cache or False)
        print(f"Indexed: {library.add(folder, progress=False)}")

        # 2. Retrieve: moments (video, start, end, score), each described from its own frames.
        retriever = FreeVideoRetriever(library=library, k=args.k, qa=qa, describe=True)
        moments = retriever.invoke(args.query)
        print(f"Moments for {args.query!r}:")
        for rank, document in enumerate(moments, 1):
            print(f"  {rank}. " + document.page_content.replace("\n", "\n     "))
        if not moments:
            print("Nothing matches; no answer.")
            library.close()
            return 1

        # 3. Answer from the best moment's video, grounded in the frames it used.
        best = moments[0].metadata
        result = qa.ask(best["source"], args.question)
        print(f"Q: {args.question} (about {best['name']}, best moment {best['start']:.2f}s-{best['end']:.2f}s)")
        print(f"Answer: {result.answer}")
        print(f"Based on: {result.grounding()}")
        library.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
