"""LlamaIndex tools and a retriever on Free Video-LLM (needs only ``llama-index-core``).

.. code-block:: python

    from llama_index.core.agent.workflow import FunctionAgent
    from freevllm_tools.integrations.llama_index import FreeVideoToolSpec, FreeVideoRetriever

    tools = FreeVideoToolSpec(qa=qa, library=library).to_tool_list()
    agent = FunctionAgent(tools=tools, llm=llm)
    retriever = FreeVideoRetriever(library, k=4)        # NodeWithScore(TextNode(...), score)

- :class:`FreeVideoToolSpec`: ``answer_video_question`` (sync and async) and
  ``search_video_library``; the method signatures and docstrings are what the LLM sees.
- :class:`FreeVideoRetriever`: one text node per moment (or an image node of its thumbnail, on
  request), usable in a ``RetrieverQueryEngine``.

The same rules as the LangChain tools apply to arguments from an LLM (see
:mod:`freevllm_tools.security`): a refused argument raises an error of the package's own family
whose message says why; LlamaIndex agents hand that message back to the LLM as an error result.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle, TextNode
from llama_index.core.tools.tool_spec.base import SPEC_FUNCTION_TYPE, BaseToolSpec

from ..errors import InputError
from ..security import DEFAULT_MAX_FILE_BYTES, MAX_QUESTION_CHARS, MAX_RESULTS, check_count, check_question
from . import (
    DEFAULT_MAX_DURATION_S,
    VideoResolver,
    answer_text,
    describe_moment,
    moment_id,
    moment_metadata,
    moment_text,
    moments_text,
    moment_thumbnail,
)

__all__ = ["FreeVideoToolSpec", "FreeVideoRetriever"]

#: Metadata keys kept out of the text an LLM or an embedding model reads (still on the node).
_HIDDEN_KEYS = ["frame_indices", "timestamps", "thumbnail_path", "video_path", "best_frame"]


class FreeVideoToolSpec(BaseToolSpec):
    """Video question answering and library search as LlamaIndex tools.

    ``qa`` answers questions (``answer_video_question``); ``library``, when given, adds
    ``search_video_library`` and lets ``video`` be a library video id. ``allowed_roots`` are the
    folders a ``video`` path may point into (``None``: the library's folders, else the current
    directory).
    """

    spec_functions: list[SPEC_FUNCTION_TYPE] = [
        ("answer_video_question", "aanswer_video_question"),
        "search_video_library",
    ]

    def __init__(
        self,
        qa: Any | None = None,
        library: Any | None = None,
        *,
        allowed_roots: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_duration_s: float | None = DEFAULT_MAX_DURATION_S,
        max_question_chars: int = MAX_QUESTION_CHARS,
        max_k: int = MAX_RESULTS,
        max_new_tokens: int | None = None,
    ) -> None:
        if qa is None and library is None:
            raise InputError("FreeVideoToolSpec needs qa=FreeVideoLLM(...), library=VideoLibrary(...), or both")
        self.qa = qa
        self.library = library
        self.max_question_chars = max_question_chars
        self.max_k = max_k
        self.max_new_tokens = max_new_tokens
        self.resolver = VideoResolver(
            allowed_roots, library, max_file_bytes=max_file_bytes, max_duration_s=max_duration_s
        )
        present = {"answer_video_question": qa is not None, "search_video_library": library is not None}
        self.spec_functions = [
            spec for spec in type(self).spec_functions if present[spec[0] if isinstance(spec, tuple) else spec]
        ]

    def _prepare(self, video: str, question: str) -> tuple[str, str, str]:
        question = check_question(question, self.max_question_chars)
        resolved = self.resolver.resolve(video)
        return resolved.path, question, resolved.label

    def answer_video_question(self, video: str, question: str) -> str:
        """Answer a question about what is visible in a video.

        Returns the answer, then the times (in seconds) of the key frames it rests on and the
        region of each frame that was looked at. Ask one question per call.

        Args:
            video (str): A library video id (from search_video_library) or a video file path, e.g. 'clips/a.mp4'.
            question (str): One question about the visible content, e.g. 'What is held at the end?'.
        """
        path, question, label = self._prepare(video, question)
        result = self.qa.ask(path, question, max_new_tokens=self.max_new_tokens)
        return answer_text(result, label)

    async def aanswer_video_question(self, video: str, question: str) -> str:
        """Answer a question about what is visible in a video (async form of answer_video_question)."""
        path, question, label = await asyncio.to_thread(self._prepare, video, question)
        result = await self.qa.aask(path, question, max_new_tokens=self.max_new_tokens)
        return answer_text(result, label)

    def search_video_library(self, query: str, k: int = 5) -> str:
        """Find the moments in the video library that best match a description of what is seen.

        Returns up to k moments, best first, each with its video id, video name, start and end
        time in seconds and a match score. Pass a video id to answer_video_question to ask about it.

        Args:
            query (str): What the moment shows, e.g. 'a dog catching a frisbee'.
            k (int): How many moments to return, from 1 to 50.
        """
        query = check_question(query, self.max_question_chars, what="query")
        count = check_count(k, maximum=self.max_k)
        return moments_text(self.library.search(query, k=count), query)


class FreeVideoRetriever(BaseRetriever):
    """Retrieve moments from a video library as ``NodeWithScore`` nodes.

    Each node's text names the video and the time span (and, with ``describe=True``, what the
    answerer sees happen in it); its metadata holds ``source``, ``video_id``, ``start``, ``end``,
    ``score``, ``frame_indices``, ``timestamps`` and, with ``thumbnail_dir``, ``thumbnail_path``.
    With ``image_nodes=True`` (which needs ``thumbnail_dir``) the nodes are ``ImageNode`` s of the
    thumbnails, with the same text and metadata.
    """

    def __init__(
        self,
        library: Any,
        k: int = 4,
        *,
        qa: Any | None = None,
        describe: bool = False,
        videos: list[str] | None = None,
        thumbnail_dir: str | os.PathLike[str] | None = None,
        image_nodes: bool = False,
        max_k: int = MAX_RESULTS,
        describe_max_new_tokens: int = 48,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if not callable(getattr(library, "search", None)):
            raise InputError(f"library must be a VideoLibrary (with .search), got {type(library).__name__}")
        if describe and qa is None:
            raise InputError("describe=True needs qa=FreeVideoLLM(...) to write the descriptions")
        if image_nodes and thumbnail_dir is None:
            raise InputError("image_nodes=True needs thumbnail_dir=... to write the thumbnails into")
        self.library = library
        self.k = check_count(k, maximum=max_k)
        self.qa = qa
        self.describe = describe
        self.videos = videos
        self.thumbnail_dir = None if thumbnail_dir is None else os.fspath(thumbnail_dir)
        self.image_nodes = image_nodes
        self.max_k = max_k
        self.describe_max_new_tokens = describe_max_new_tokens
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        query = check_question(query_bundle.query_str, what="query")
        results = []
        for moment in self.library.search(query, k=self.k, videos=self.videos):
            description = (
                describe_moment(self.qa, moment, max_new_tokens=self.describe_max_new_tokens)
                if self.describe
                else None
            )
            thumbnail = None
            if self.thumbnail_dir is not None:
                thumbnail = moment_thumbnail(self.library, moment, self.thumbnail_dir)
            fields: dict[str, Any] = {
                "id_": moment_id(moment),
                "text": moment_text(moment, description),
                "metadata": moment_metadata(moment, thumbnail),
                "excluded_llm_metadata_keys": list(_HIDDEN_KEYS),
                "excluded_embed_metadata_keys": list(_HIDDEN_KEYS),
            }
            node = ImageNode(image_path=thumbnail, **fields) if self.image_nodes else TextNode(**fields)
            results.append(NodeWithScore(node=node, score=float(moment.score)))
        return results

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)
