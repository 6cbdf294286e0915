"""The seed's design, as the reference the serving graph must beat: one FastAPI process,
one `model.generate` per request (FastAPI runs each sync endpoint call on its thread
pool, so concurrent requests run concurrent generate calls), no batching.

    .venv/bin/python bench/seed_baseline.py --port 8100 [--model FOLDER]

Answers POST /generate with the same body and usage fields as the service, so the
benchmark drives both with one client.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deployments.model_source import embedded_model_folder  # noqa: E402


class Body(BaseModel):
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


def create_app(model_folder: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    app = FastAPI()

    @app.post("/generate")
    def generate(body: Body) -> dict:
        inputs = tokenizer(body.prompt, return_tensors="pt")
        if body.seed is not None:
            torch.manual_seed(body.seed)
        sampled = body.temperature > 0
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=body.max_new_tokens,
                do_sample=sampled,
                temperature=body.temperature if sampled else None,
                top_p=body.top_p if sampled else None,
                top_k=None,
                pad_token_id=tokenizer.eos_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        prompt_tokens = int(inputs["input_ids"].shape[1])
        return {
            "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": int(new_tokens.shape[0]),
                "total_tokens": prompt_tokens + int(new_tokens.shape[0]),
            },
        }

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default=str(embedded_model_folder()))
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
