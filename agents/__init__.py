"""Ready agents on the freevllm-tools video tools. Run them from the repository root:

- ``python -m agents.langchain_agent FOLDER "QUESTION" --model provider:model``: a LangChain agent
  (``create_agent``) with ``video_qa`` and ``video_search`` over a folder of videos;
- ``python -m agents.llama_index_agent FOLDER "QUESTION" --model provider:model``: a LlamaIndex
  ``FunctionAgent`` with :class:`~freevllm_tools.integrations.llama_index.FreeVideoToolSpec`;
- ``python -m agents.chatbot VIDEO``: a terminal chatbot about one video, answered by the LLaVA
  answerer alone (no other LLM), on :mod:`freevllm_tools.chat`.

Each takes the ``freevllm`` CLI's model flags (``--guide``, ``--llm``, ``--device``, ...) and
``--tiny`` (tiny random models: offline, seconds, gibberish answers; for trying the wiring).
Each exposes ``main(argv)`` and a ``build_agent`` / session function, so that tests and other
programs can drive it with their own models.
"""
