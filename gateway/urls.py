"""The gateway's routes, at the site's root: Ollama's under /api/ (beside /api/v1/, /api/schema/ and
/api/docs/, which they do not touch) and OpenAI's under /v1/."""

from django.urls import path

from . import views_ollama as ollama
from . import views_openai as openai

urlpatterns = [
    path("api/version", ollama.version, name="ollama-version"),
    path("api/tags", ollama.tags, name="ollama-tags"),
    path("api/ps", ollama.ps, name="ollama-ps"),
    path("api/show", ollama.show, name="ollama-show"),
    path("api/generate", ollama.generate, name="ollama-generate"),
    path("api/chat", ollama.chat, name="ollama-chat"),
    path("api/embed", ollama.embed, name="ollama-embed"),
    path("api/embeddings", ollama.embeddings, name="ollama-embeddings"),
    path("v1/models", openai.models, name="openai-models"),
    path("v1/chat/completions", openai.chat_completions, name="openai-chat-completions"),
    path("v1/completions", openai.completions, name="openai-completions"),
    path("v1/embeddings", openai.embeddings, name="openai-embeddings"),
]
