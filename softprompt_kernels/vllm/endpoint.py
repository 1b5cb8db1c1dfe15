"""The vLLM endpoint plugin: adapters registered when the API server starts, and at run time over HTTP.

- ``GET /v1/softprompt/adapters``: the registered adapters (name, kind, virtual tokens, path);
- ``POST /v1/softprompt/adapters`` ``{"name": ..., "path": ...}``: registers a PEFT directory (a multitask adapter
  becomes ``name:task`` per task); 400 naming the adapter and the reason, 409 for a name already in use;
- ``DELETE /v1/softprompt/adapters/{name}``: unregisters; 404 for an unknown name.
Adapters named in ``SOFTPROMPT_VLLM_ADAPTERS`` (set by ``softprompt-kernels serve --engine vllm``) are registered
in ``init_state``; a bad one stops the server with its name and the reason.
"""
import asyncio
import json
import os

from fastapi import APIRouter, Request  # vLLM's API server is FastAPI; this module loads only there
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from . import ADAPTERS_ENV, PLUGIN_NAME, AdapterError, plan_adapters, publish, register
from .table import TABLE


class AddAdapter(BaseModel):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


class SoftPromptEndpoints:
    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self):
        register()
        self._lock = asyncio.Lock()

    def attach_router(self, app) -> None:
        router = APIRouter()

        def error(status: int, message: str, param: str) -> JSONResponse:
            return JSONResponse(status_code=status, content={"error": {
                "message": message, "type": "BadRequestError" if status == 400 else "NotFoundError"
                if status == 404 else "ConflictError", "param": param, "code": status}})

        @router.get("/v1/softprompt/adapters")
        async def list_adapters():
            return {"adapters": [{"name": e.name, "kind": e.kind, "virtual_tokens": e.length, "path": e.path}
                                 for e in TABLE.entries()]}

        @router.post("/v1/softprompt/adapters")
        async def add_adapter(body: AddAdapter, raw: Request):
            engine = raw.app.state.engine_client
            async with self._lock:
                if TABLE.get(body.name) is not None:
                    return error(409, f"an adapter named {body.name!r} is already registered", "name")
                try:
                    served = await self._register(engine, {body.name: body.path})
                except AdapterError as exc:
                    status = 409 if "already registered" in str(exc) else 400
                    return error(status, str(exc), "path" if status == 400 else "name")
            return {"served": served}

        @router.delete("/v1/softprompt/adapters/{name}")
        async def remove_adapter(name: str, raw: Request):
            async with self._lock:
                try:
                    TABLE.remove(name)
                except KeyError:
                    return error(404, f"no adapter named {name!r}; registered: {TABLE.names()}", "name")
                await raw.app.state.engine_client.collective_rpc("softprompt_remove", args=(name,))
            return {"removed": name}

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            return
        adapters = dict(json.loads(os.environ.get(ADAPTERS_ENV, "[]")))
        if adapters:
            served = await self._register(engine_client, adapters)
            print(f"softprompt-kernels: serving adapters {served}", flush=True)

    @staticmethod
    async def _register(engine_client, adapters):
        config = engine_client.model_config
        names = getattr(config, "served_model_name", None) or config.model
        names = tuple(names) if isinstance(names, (list, tuple)) else (names,)
        specs, entries = plan_adapters(adapters, config, names)
        try:
            await engine_client.collective_rpc("softprompt_add", args=(specs,))
        except Exception as exc:  # a worker could not build it (e.g. the model's weights for a prompt pass)
            raise AdapterError(f"adapters {list(adapters)}: the workers refused them: {exc}") from exc
        publish(entries)
        return [entry.name for entry in entries]
