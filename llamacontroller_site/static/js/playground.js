// The playground (templates/playground.html): a chat with one model through the gateway's OpenAI route, as the
// logged-in user (session cookie + CSRF header), streamed. Shows the request's time to first token and its
// tokens per second (completion tokens over the time after the first token, as the usage page counts them).
(function () {
  "use strict";
  const root = document.getElementById("playground");
  if (!root) return;
  const log = document.getElementById("chat-log");
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const send = document.getElementById("chat-send");
  const stop = document.getElementById("chat-stop");
  const stats = document.getElementById("chat-stats");
  const headers = JSON.parse(document.body.getAttribute("hx-headers") || "{}");
  const messages = [];
  let controller = null;

  function bubble(role, text) {
    const item = document.createElement("div");
    item.className = `chat-message chat-${role}`;
    item.textContent = text;
    log.appendChild(item);
    log.scrollTop = log.scrollHeight;
    return item;
  }

  function finish(note) {
    controller = null;
    send.disabled = false;
    stop.disabled = true;
    if (note) stats.textContent = note;
  }

  async function ask(text) {
    messages.push({ role: "user", content: text });
    bubble("user", text);
    const answer = bubble("assistant", "");
    answer.classList.add("streaming");
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    stats.textContent = "waiting for the first token…";
    const started = performance.now();
    let first = null;
    let pieces = 0;
    let usage = null;
    try {
      const response = await fetch(root.dataset.url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", ...headers },
        body: JSON.stringify({
          model: root.dataset.model, messages, stream: true, stream_options: { include_usage: true },
        }),
        signal: controller.signal,
      });
      if (!response.ok) {
        const body = await response.text();
        let detail = body;
        try { detail = JSON.parse(body).error.message; } catch (e) { /* not JSON: the text itself */ }
        answer.classList.add("chat-error");
        answer.textContent = `${response.status}: ${detail}`;
        messages.pop();
        return finish("refused");
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, end).trim();
          buffer = buffer.slice(end + 1);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          let chunk;
          try { chunk = JSON.parse(data); } catch (e) { continue; }
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            pieces += 1;
            answer.textContent += delta.content;
            log.scrollTop = log.scrollHeight;
          }
        }
      }
      messages.push({ role: "assistant", content: answer.textContent });
      finish(describe(started, first, usage ? usage.completion_tokens : pieces));
    } catch (error) {
      if (error.name === "AbortError") {
        messages.push({ role: "assistant", content: answer.textContent });
        finish("stopped · " + describe(started, first, pieces));
      } else {
        answer.classList.add("chat-error");
        answer.textContent += ` [${error.message}]`;
        finish("failed");
      }
    } finally {
      answer.classList.remove("streaming");
    }
  }

  function describe(started, first, tokens) {
    if (first === null) return "no tokens";
    const ttft = (first - started) / 1000;
    const after = (performance.now() - first) / 1000;
    const speed = after > 0 && tokens > 1 ? ` · ${(tokens / after).toFixed(1)} tokens/s` : "";
    return `first token after ${ttft.toFixed(2)} s · ${tokens} tokens${speed}`;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    ask(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  stop.addEventListener("click", () => controller && controller.abort());
  document.getElementById("chat-clear").addEventListener("click", () => {
    if (controller) controller.abort();
    messages.length = 0;
    log.textContent = "";
    stats.textContent = "";
  });
})();
