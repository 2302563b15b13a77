"""LangChain tools and a retriever on Free Video-LLM (needs only ``langchain-core``).

.. code-block:: python

    from freevllm_tools import FreeVideoLLM, VideoLibrary
    from freevllm_tools.integrations.langchain import FreeVideoToolkit

    qa = FreeVideoLLM.from_pretrained()
    library = VideoLibrary("videos.lib", guide=qa.guide)
    library.add("clips/cooking.mp4")
    tools = FreeVideoToolkit(qa=qa, library=library).get_tools()   # video_qa, video_search

- :class:`FreeVideoQATool` (``video_qa``): answers a question about one video. Its content is the
  answer followed by the times and regions it rests on (the model never sees the artifact); the
  artifact is the full :class:`~freevllm_tools.pipeline.AskResult` as JSON-serialisable data.
- :class:`FreeVideoSearchTool` (``video_search``): finds moments across a
  :class:`~freevllm_tools.library.VideoLibrary`.
- :class:`FreeVideoRetriever`: one :class:`~langchain_core.documents.Document` per moment.
- :class:`FreeVideoToolkit`: the tools, sharing one pipeline, library and path policy.

Tool arguments come from an LLM and are untrusted: ``video`` is a library video id or a path that
:class:`~freevllm_tools.security.PathPolicy` checks against the allowed folders (deny by default,
``realpath`` semantics, no URLs, no devices, video extensions only, size and duration limits).
Every refusal, and every error of the package's own family, comes back to the agent as a tool
error it can read (``ToolException`` with ``handle_tool_error=True``), never as an exception
through the agent loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForToolRun,
    CallbackManagerForRetrieverRun,
    CallbackManagerForToolRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import BaseTool, BaseToolkit, ToolException
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import FreeVideoError, InputError
from ..security import DEFAULT_MAX_FILE_BYTES, MAX_QUESTION_CHARS, MAX_RESULTS, check_count, check_question
from . import (
    DEFAULT_MAX_DURATION_S,
    QA_DESCRIPTION,
    SEARCH_DESCRIPTION,
    VideoResolver,
    answer_text,
    describe_moment,
    moment_id,
    moment_metadata,
    moment_text,
    moments_text,
    moment_thumbnail,
)

__all__ = [
    "FreeVideoQATool",
    "FreeVideoSearchTool",
    "FreeVideoRetriever",
    "FreeVideoToolkit",
    "VideoQAInput",
    "VideoSearchInput",
]


@contextmanager
def _tool_errors() -> Iterator[None]:
    """Turn the package's own errors into ToolException, which the agent reads as a tool result."""
    try:
        yield
    except FreeVideoError as error:
        raise ToolException(str(error)) from error


def _validation_message(error: ValidationError | Exception) -> str:
    """A tool error an LLM can act on for arguments that do not fit the schema."""
    if isinstance(error, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'arguments'}: {item['msg']}"
            for item in error.errors()
        )
    else:
        problems = str(error)
    return f"Invalid tool arguments ({problems}). Check the argument names and types and call again."


def _needs(value: Any, methods: tuple[str, ...], what: str) -> Any:
    """``value`` when it has the ``methods``; InputError naming what was expected otherwise."""
    if not all(callable(getattr(value, m, None)) for m in methods):
        expected = ", ".join(f".{m}()" for m in methods)
        msg = f"expected {what} (an object with {expected}), got {type(value).__name__}"
        raise InputError(msg)
    return value


class VideoQAInput(BaseModel):
    """Arguments of ``video_qa``."""

    model_config = ConfigDict(coerce_numbers_to_str=True)  # a video id given as a number

    video: str = Field(
        description="A library video id (as returned by video_search) or the path of a video file "
        "inside the allowed folders, e.g. 'clips/cooking.mp4'."
    )
    question: str = Field(
        description=f"One question about what is visible in the video, at most {MAX_QUESTION_CHARS} characters."
    )


class VideoSearchInput(BaseModel):
    """Arguments of ``video_search``."""

    query: str = Field(description="What the moment shows, e.g. 'a person pouring batter into a pan'.")
    k: int = Field(default=5, description=f"How many moments to return, from 1 to {MAX_RESULTS}.")


class FreeVideoQATool(BaseTool):
    """``video_qa``: answer a question about a video, grounded in the frames and regions it used.

    >>> tool = FreeVideoQATool(qa=qa, allowed_roots=["videos"])
    >>> message = tool.invoke({"type": "tool_call", "id": "1", "name": "video_qa",
    ...                        "args": {"video": "cooking.mp4", "question": "What is cooked?"}})
    >>> message.content      # 'Answer: ...\\nBased on: slow frames at 1.20s region ...'
    >>> message.artifact     # AskResult.to_dict(): pathways, frame indices, timestamps, boxes
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "video_qa"
    description: str = QA_DESCRIPTION
    args_schema: type[BaseModel] = VideoQAInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[[ToolException], str] | None = True
    handle_validation_error: bool | str | Callable[[ValidationError], str] | None = _validation_message

    qa: Any
    """The :class:`~freevllm_tools.pipeline.FreeVideoLLM` that answers (anything with ``ask``/``aask``)."""
    library: Any | None = None
    """An optional :class:`~freevllm_tools.library.VideoLibrary` whose video ids ``video`` may name."""
    allowed_roots: list[str] | None = None
    """Folders a ``video`` path may point into. ``None``: the library's folders, else the current directory."""
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    """Largest video file accepted, in bytes."""
    max_duration_s: float | None = DEFAULT_MAX_DURATION_S
    """Longest video accepted, in seconds (``None``: no limit)."""
    max_question_chars: int = MAX_QUESTION_CHARS
    """Longest question accepted, in characters."""
    max_new_tokens: int | None = None
    """Longest answer, in tokens (``None``: the pipeline's default)."""

    _resolver: VideoResolver = PrivateAttr()

    @field_validator("qa")
    @classmethod
    def _check_qa(cls, value: Any) -> Any:
        return _needs(value, ("ask", "aask"), "qa=FreeVideoLLM")

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _roots_list(cls, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            return [os.fspath(value)]
        if value is not None and not isinstance(value, (str, bytes)):
            return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        return value

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._resolver = VideoResolver(
            self.allowed_roots,
            self.library,
            max_file_bytes=self.max_file_bytes,
            max_duration_s=self.max_duration_s,
        )

    @property
    def resolver(self) -> VideoResolver:
        """How ``video`` arguments become checked file paths."""
        return self._resolver

    def _prepare(self, video: str, question: str) -> tuple[str, str, str]:
        """(real path, question, label for the text) or ToolException saying what is wrong."""
        with _tool_errors():
            question = check_question(question, self.max_question_chars)
            resolved = self._resolver.resolve(video)
        return resolved.path, question, resolved.label

    def _output(self, result: Any, label: str) -> tuple[str, dict[str, Any]]:
        artifact = result.to_dict()
        artifact["label"] = label
        return answer_text(result, label), artifact

    def _run(
        self, video: str, question: str, run_manager: CallbackManagerForToolRun | None = None
    ) -> tuple[str, dict[str, Any]]:
        path, question, label = self._prepare(video, question)
        with _tool_errors():
            result = self.qa.ask(path, question, max_new_tokens=self.max_new_tokens)
        return self._output(result, label)

    async def _arun(
        self, video: str, question: str, run_manager: AsyncCallbackManagerForToolRun | None = None
    ) -> tuple[str, dict[str, Any]]:
        path, question, label = await asyncio.to_thread(self._prepare, video, question)
        with _tool_errors():
            result = await self.qa.aask(path, question, max_new_tokens=self.max_new_tokens)
        return self._output(result, label)


class FreeVideoSearchTool(BaseTool):
    """``video_search``: find the moments in a video library that match a description."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "video_search"
    description: str = SEARCH_DESCRIPTION
    args_schema: type[BaseModel] = VideoSearchInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[[ToolException], str] | None = True
    handle_validation_error: bool | str | Callable[[ValidationError], str] | None = _validation_message

    library: Any
    """The :class:`~freevllm_tools.library.VideoLibrary` to search (anything with ``search``)."""
    max_k: int = MAX_RESULTS
    """Largest ``k`` a caller may ask for."""
    max_query_chars: int = MAX_QUESTION_CHARS
    """Longest query accepted, in characters."""

    @field_validator("library")
    @classmethod
    def _check_library(cls, value: Any) -> Any:
        return _needs(value, ("search", "videos"), "library=VideoLibrary")

    def _run(
        self, query: str, k: int = 5, run_manager: CallbackManagerForToolRun | None = None
    ) -> tuple[str, list[dict[str, Any]]]:
        with _tool_errors():
            query = check_question(query, self.max_query_chars, what="query")
            k = check_count(k, maximum=self.max_k)
            moments = self.library.search(query, k=k)
        return moments_text(moments, query), [moment_metadata(m) for m in moments]


class FreeVideoRetriever(BaseRetriever):
    """Retrieve moments from a video library as :class:`~langchain_core.documents.Document`.

    ``page_content`` names the video and the time span (and, with ``describe=True``, what the
    answerer sees happen in it); ``metadata`` holds ``source`` (the file), ``video_id``, ``start``,
    ``end``, ``score``, ``frame_indices``, ``timestamps`` and, with ``thumbnail_dir``,
    ``thumbnail_path``. ``invoke(query, k=...)`` overrides ``k`` for one call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    library: Any
    """The :class:`~freevllm_tools.library.VideoLibrary` to search."""
    k: int = 4
    """Moments per query."""
    qa: Any | None = None
    """The :class:`~freevllm_tools.pipeline.FreeVideoLLM` that writes descriptions (needed for ``describe``)."""
    describe: bool = False
    """Add a short description of each moment, written by the answerer from the moment's frames."""
    videos: list[int | str] | None = None
    """Search only these library videos, by id or path (``None``: all)."""
    thumbnail_dir: str | None = None
    """Where to write a PNG of each moment's best frame (``None``: no thumbnails)."""
    max_k: int = MAX_RESULTS
    """Largest ``k`` accepted."""
    describe_max_new_tokens: int = 48
    """Longest description, in tokens."""

    @field_validator("library")
    @classmethod
    def _check_library(cls, value: Any) -> Any:
        return _needs(value, ("search", "videos"), "library=VideoLibrary")

    @model_validator(mode="after")
    def _check_describe(self) -> FreeVideoRetriever:
        check_count(self.k, maximum=self.max_k)
        if self.describe and self.qa is None:
            raise InputError("describe=True needs qa=FreeVideoLLM(...) to write the descriptions")
        return self

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        query = check_question(query, what="query")
        count = check_count(self.k if k is None else k, maximum=self.max_k)
        documents = []
        for moment in self.library.search(query, k=count, videos=self.videos):
            description = (
                describe_moment(self.qa, moment, max_new_tokens=self.describe_max_new_tokens)
                if self.describe
                else None
            )
            thumbnail = None
            if self.thumbnail_dir is not None:
                thumbnail = moment_thumbnail(self.library, moment, self.thumbnail_dir)
            documents.append(
                Document(
                    id=moment_id(moment),
                    page_content=moment_text(moment, description),
                    metadata=moment_metadata(moment, thumbnail),
                )
            )
        return documents


class FreeVideoToolkit(BaseToolkit):
    """``video_qa`` (with a pipeline) and ``video_search`` (with a library), sharing one path policy."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    qa: Any | None = None
    """The pipeline for ``video_qa``; ``None`` leaves that tool out."""
    library: Any | None = None
    """The library for ``video_search`` and for video ids in ``video_qa``; ``None`` leaves search out."""
    allowed_roots: list[str] | None = None
    """Folders ``video_qa`` may read paths from (``None``: the library's folders, else the current directory)."""
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    """Largest video file accepted, in bytes."""
    max_duration_s: float | None = DEFAULT_MAX_DURATION_S
    """Longest video accepted, in seconds."""
    max_k: int = MAX_RESULTS
    """Largest ``k`` for ``video_search``."""

    @model_validator(mode="after")
    def _check_parts(self) -> FreeVideoToolkit:
        if self.qa is None and self.library is None:
            raise InputError("FreeVideoToolkit needs qa=FreeVideoLLM(...), library=VideoLibrary(...), or both")
        return self

    def get_tools(self) -> list[BaseTool]:
        """``[video_qa, video_search]``, each present when its part was given."""
        tools: list[BaseTool] = []
        if self.qa is not None:
            tools.append(
                FreeVideoQATool(
                    qa=self.qa,
                    library=self.library,
                    allowed_roots=self.allowed_roots,
                    max_file_bytes=self.max_file_bytes,
                    max_duration_s=self.max_duration_s,
                )
            )
        if self.library is not None:
            tools.append(FreeVideoSearchTool(library=self.library, max_k=self.max_k))
        return tools
