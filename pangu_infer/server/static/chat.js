// The chat page: one conversation streamed from v1/chat/completions (server-sent events).
// Settings and the API key live in localStorage; a 401 asks for the key and retries.
import { renderMarkdown } from "./markdown.js";

const STORE = "pangu-infer.";
const THINKING = { on: true, off: false, auto: "auto" }; // -> chat_template_kwargs.enable_thinking
const $ = (id) => document.getElementById(id);

const settings = loadSettings();
let apiKey = localStorage.getItem(STORE + "apiKey") || "";
const messages = []; // {role, content, reasoning, toolCalls, ...} in conversation order
let inFlight = null; // {controller, message} of the reply being streamed
let keyPrompt = null; // the open API-key dialog's promise, shared by concurrent 401s

// ---------------------------------------------------------------- settings
function loadSettings() {
  const defaults = { system: "", temperature: "", maxTokens: "", tools: "", thinking: "on" };
  try {
    return { ...defaults, ...JSON.parse(localStorage.getItem(STORE + "settings") || "{}") };
  } catch {
    return defaults;
  }
}

function saveSettings() {
  localStorage.setItem(STORE + "settings", JSON.stringify(settings));
}

/** The settings form's values, or an error message naming the bad field. */
function readSettingsForm() {
  const temperature = $("temperature").value.trim();
  const maxTokens = $("max-tokens").value.trim();
  const tools = $("tools").value.trim();
  if (temperature !== "" && !(Number(temperature) >= 0)) return { error: `Temperature must be a number >= 0, not "${temperature}".` };
  if (maxTokens !== "" && !(Number.isInteger(Number(maxTokens)) && Number(maxTokens) >= 1)) {
    return { error: `Max tokens must be a whole number >= 1, not "${maxTokens}".` };
  }
  if (tools !== "") {
    let parsed;
    try {
      parsed = JSON.parse(tools);
    } catch (e) {
      return { error: `Tools is not valid JSON: ${e.message}` };
    }
    if (!Array.isArray(parsed)) return { error: "Tools must be a JSON list of tools." };
  }
  return { values: { system: $("system").value, temperature, maxTokens, tools }, key: $("settings-key").value.trim() };
}

function openSettings() {
  $("system").value = settings.system;
  $("temperature").value = settings.temperature;
  $("max-tokens").value = settings.maxTokens;
  $("tools").value = settings.tools;
  $("settings-key").value = apiKey;
  $("settings-error").hidden = true;
  $("settings").returnValue = "";
  $("settings").showModal();
}

function setApiKey(key) {
  apiKey = key;
  if (key) localStorage.setItem(STORE + "apiKey", key);
  else localStorage.removeItem(STORE + "apiKey");
}

// ---------------------------------------------------------------- HTTP
/** fetch with the API key; on 401 ask for a (new) key and try again. */
async function api(path, init = {}) {
  for (;;) {
    const headers = { ...(init.headers || {}) };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    await askForKey(apiKey ? "The server did not accept this key. Enter the key it was started with." : "This server needs an API key.");
  }
}

function askForKey(reason) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve, reject) => {
      const dialog = $("key-dialog");
      $("key-reason").textContent = reason;
      $("api-key").value = "";
      dialog.returnValue = "";
      dialog.addEventListener(
        "close",
        () => {
          keyPrompt = null;
          const key = $("api-key").value.trim();
          if (dialog.returnValue === "ok" && key) {
            setApiKey(key);
            resolve();
          } else {
            reject(new Error("This server needs an API key: enter it in Settings."));
          }
        },
        { once: true }
      );
      dialog.showModal();
    });
  }
  return keyPrompt;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error.message;
  } catch {
    return `HTTP ${response.status}: ${text.slice(0, 300)}`;
  }
}

/** The `data:` payloads of a text/event-stream body, one string per event. */
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function loadModelName() {
  try {
    const response = await api("v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    $("model-name").textContent = body.data?.[0]?.id ?? "";
  } catch (e) {
    $("model-name").textContent = "";
    $("model-name").title = e.message;
  }
}

// ---------------------------------------------------------------- conversation
function requestBody() {
  const history = [];
  if (settings.system.trim()) history.push({ role: "system", content: settings.system });
  for (const m of messages) {
    if (m === inFlight?.message) continue;
    if (m.role === "user") history.push({ role: "user", content: m.content });
    else if (m.content || m.toolCalls.length) {
      const entry = { role: "assistant", content: m.content || null };
      if (m.toolCalls.length) entry.tool_calls = m.toolCalls.filter(Boolean);
      history.push(entry);
    }
  }
  const body = {
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: THINKING[settings.thinking] },
  };
  if (settings.temperature !== "") body.temperature = Number(settings.temperature);
  if (settings.maxTokens !== "") body.max_tokens = Number(settings.maxTokens);
  if (settings.tools !== "") body.tools = JSON.parse(settings.tools);
  return body;
}

async function send(text) {
  if (inFlight) return;
  const message = { role: "user", content: text };
  messages.push(message);
  addUserNode(message);
  await reply();
}

async function reply() {
  const message = { role: "assistant", content: "", reasoning: "", toolCalls: [], state: "streaming" };
  const controller = new AbortController();
  inFlight = { controller, message };
  messages.push(message);
  addAssistantNode(message);
  setBusy(true);
  let finished = false;
  try {
    const response = await api("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of serverSentEvents(response.body)) {
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) message.usage = chunk.usage;
      for (const choice of chunk.choices || []) applyDelta(message, choice);
      scheduleRender(message);
    }
    if (!finished) throw new Error("The connection closed before the reply finished.");
    message.state = "done";
  } catch (e) {
    if (controller.signal.aborted) message.state = "stopped";
    else {
      message.state = "error";
      message.error = e.message || String(e);
    }
  } finally {
    message.ended = performance.now();
    inFlight = null;
    renderAssistant(message);
    setBusy(false);
  }
}

function applyDelta(message, choice) {
  const delta = choice.delta || {};
  const now = performance.now();
  if (delta.reasoning_content) {
    message.reasoningStarted ??= now;
    message.reasoning += delta.reasoning_content;
  }
  if (delta.content) {
    message.contentStarted ??= now;
    message.content += delta.content;
  }
  for (const call of delta.tool_calls || []) {
    message.contentStarted ??= now;
    const index = call.index ?? message.toolCalls.length;
    const slot = (message.toolCalls[index] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
    if (call.id) slot.id = call.id;
    if (call.function?.name) slot.function.name += call.function.name;
    if (call.function?.arguments) slot.function.arguments += call.function.arguments;
  }
  if (choice.finish_reason) message.finishReason = choice.finish_reason;
}

function stop() {
  inFlight?.controller.abort();
}

function regenerate() {
  if (inFlight) return;
  while (messages.length && messages[messages.length - 1].role === "assistant") messages.pop().node.remove();
  if (messages.length) reply();
}

function clearConversation() {
  stop();
  for (const m of messages) m.node.remove();
  messages.length = 0;
  $("empty").hidden = false;
  $("input").focus();
}

// ---------------------------------------------------------------- rendering
function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function addUserNode(message) {
  $("empty").hidden = true;
  message.node = element("article", "msg user");
  message.node.append(element("div", "role", "You"), element("div", "bubble", message.content));
  $("log").append(message.node);
  scrollToEnd(true);
}

function addAssistantNode(message) {
  $("empty").hidden = true;
  const node = (message.node = element("article", "msg assistant"));
  const thinking = element("details", "thinking");
  thinking.hidden = true;
  thinking.append(element("summary", "", "Thinking…"), element("div", "reasoning"));
  // once the reader opens or folds the thinking, it stays as they left it
  thinking.querySelector("summary").addEventListener("click", () => (message.thinkingToggled = true));
  const meta = element("div", "meta");
  const regen = element("button", "link regenerate", "Regenerate");
  regen.type = "button";
  regen.addEventListener("click", regenerate);
  const copy = element("button", "link copy-reply", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => copyText(message.content, copy));
  meta.append(element("span", "stats"), regen, copy);
  node.append(element("div", "role", "Assistant"), thinking, element("div", "content"), element("div", "tool-calls"), element("div", "error"), meta);
  $("log").append(node);
  renderAssistant(message);
  scrollToEnd(true);
}

function scheduleRender(message) {
  if (message.renderPending) return;
  message.renderPending = true;
  requestAnimationFrame(() => {
    message.renderPending = false;
    renderAssistant(message);
  });
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(1)} s`;
}

function renderAssistant(message) {
  const node = message.node;
  const follow = nearEnd();
  node.classList.toggle("streaming", message.state === "streaming");
  node.dataset.state = message.state;

  const thinking = node.querySelector(".thinking");
  thinking.hidden = !message.reasoning;
  if (message.reasoning) {
    node.querySelector(".reasoning").textContent = message.reasoning;
    const answering = message.contentStarted !== undefined;
    const stillThinking = message.state === "streaming" && !answering;
    const took = (answering ? message.contentStarted : message.ended ?? performance.now()) - message.reasoningStarted;
    thinking.querySelector("summary").textContent = stillThinking ? "Thinking…" : `Thought for ${seconds(took)}`;
    if (!message.thinkingToggled) thinking.open = stillThinking; // open while it thinks, folded for the answer
  }

  const content = node.querySelector(".content");
  if (message.rendered !== message.content) {
    content.innerHTML = renderMarkdown(message.content);
    message.rendered = message.content;
  }

  const calls = node.querySelector(".tool-calls");
  calls.replaceChildren(...message.toolCalls.filter(Boolean).map(toolCallNode));

  const error = node.querySelector(".error");
  error.hidden = !message.error;
  error.textContent = message.error || "";

  node.querySelector(".stats").textContent = statsText(message);
  updateControls();
  if (follow) scrollToEnd();
}

function toolCallNode(call) {
  const node = element("div", "tool-call");
  let args = call.function.arguments;
  try {
    args = JSON.stringify(JSON.parse(args), null, 2);
  } catch {
    // still streaming, or not JSON: show it as sent
  }
  node.append(element("div", "tool-label", "Tool call"), element("span", "tool-name", call.function.name), element("pre", "tool-args", args));
  return node;
}

function statsText(message) {
  if (message.state === "streaming") return "";
  const parts = [];
  const tokens = message.usage?.completion_tokens;
  if (tokens !== undefined) {
    parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
    const first = Math.min(message.reasoningStarted ?? Infinity, message.contentStarted ?? Infinity);
    if (tokens > 1 && Number.isFinite(first) && message.ended > first) parts.push(`${((tokens - 1) / ((message.ended - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (message.state === "stopped") parts.push("stopped");
  if (message.finishReason === "length") parts.push("cut at max tokens");
  if (message.finishReason === "tool_calls") parts.push("waiting for tool results");
  return parts.join(" · ");
}

function updateControls() {
  const last = messages[messages.length - 1];
  for (const m of messages) {
    if (m.role !== "assistant") continue;
    m.node.querySelector(".regenerate").hidden = m !== last || !!inFlight;
    m.node.querySelector(".copy-reply").hidden = !m.content || m.state === "streaming";
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  updateControls();
}

function nearEnd() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

function scrollToEnd(force = false) {
  const log = $("log");
  if (force || nearEnd()) log.scrollTop = log.scrollHeight;
}

async function copyText(text, button) {
  try {
    if (!window.isSecureContext || !navigator.clipboard) throw new Error("no clipboard API");
    await navigator.clipboard.writeText(text);
  } catch {
    // plain-http pages on another host have no clipboard API: copy through a selection
    const area = element("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = label), 1200);
}

function autoGrow() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${input.scrollHeight + 2}px`;
}

// ---------------------------------------------------------------- wiring
function start() {
  const input = $("input");
  const chosen = document.querySelector(`input[name="thinking"][value="${settings.thinking}"]`);
  if (chosen) chosen.checked = true;
  for (const radio of document.querySelectorAll('input[name="thinking"]')) {
    radio.addEventListener("change", () => {
      settings.thinking = radio.value;
      saveSettings();
    });
  }
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim() || inFlight) return;
    input.value = "";
    autoGrow();
    send(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  input.addEventListener("input", autoGrow);
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearConversation);
  $("open-settings").addEventListener("click", openSettings);
  $("log").addEventListener("click", (event) => {
    const button = event.target.closest(".copy-code");
    if (button) copyText(button.closest(".code-block").querySelector("code").textContent, button);
  });
  for (const id of ["settings", "key-dialog"]) {
    $(id).querySelector("button[value=cancel]").addEventListener("click", () => $(id).close("cancel"));
  }
  $("settings-form").addEventListener("submit", (event) => {
    const form = readSettingsForm();
    if (form.error) {
      event.preventDefault(); // keep the dialog open
      $("settings-error").textContent = form.error;
      $("settings-error").hidden = false;
      return;
    }
    Object.assign(settings, form.values);
    saveSettings();
    const keyChanged = form.key !== apiKey;
    setApiKey(form.key);
    if (keyChanged) loadModelName();
  });
  input.focus();
  loadModelName();
}

start();
