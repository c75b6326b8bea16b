"""GET /docs: the API reference as one self-contained page, so it works offline.

FastAPI's own /docs loads Swagger UI's script and styles from a CDN, which an air-gapped machine cannot reach
(the page stays blank). This page has no external resource: a few lines of inline script read /openapi.json
and list each route with its summary, parameters and responses, plus a form that posts to /v1/embeddings.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__ - API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
code,pre,textarea,input{font:13px ui-monospace,monospace}
pre{background:#f5f5f5;padding:.6em;overflow:auto;max-height:24em}
.route{border:1px solid #ddd;border-radius:6px;margin:.8em 0;padding:.4em .8em}
.m{display:inline-block;min-width:4em;font-weight:bold}
textarea{width:100%;height:5em}
</style></head>
<body>
<h1>__TITLE__</h1>
<p id="desc"></p>
<p>Machine-readable schema: <a href="openapi.json">/openapi.json</a>. Errors always have OpenAI's shape
<code>{"error": {"message", "type", "param", "code"}}</code>.</p>
<h2>Try it: POST /v1/embeddings</h2>
<p><label>API key (if the server requires one) <input id="key" type="password" size="30"></label></p>
<textarea id="body">{"input": ["hello world", "what is an embedding?"]}</textarea>
<p><button id="send">Send</button></p>
<pre id="out">(the response appears here; embeddings are shortened to their first 8 numbers)</pre>
<h2>Routes</h2>
<div id="routes">Loading /openapi.json ...</div>
<script>
const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
fetch("openapi.json").then(r => r.json()).then(spec => {
  document.getElementById("desc").textContent = spec.info.description || "";
  const html = [];
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const params = (op.parameters || []).map(p => esc(p.name) + " (" + esc(p.in) + ")").join(", ");
      const body = op.requestBody ? Object.values(op.requestBody.content)[0].schema : null;
      const codes = Object.entries(op.responses || {}).map(([c, r]) => esc(c) + " " + esc(r.description)).join("; ");
      html.push('<div class="route"><span class="m">' + esc(method.toUpperCase()) + "</span> <code>" + esc(path) +
        "</code> " + esc(op.summary) + (params ? "<br>parameters: " + params : "") +
        (body ? "<br>body: <code>" + esc(body.$ref ? body.$ref.split("/").pop() : JSON.stringify(body)) + "</code>" : "") +
        "<br>responses: " + codes + "</div>");
    }
  }
  const schemas = (spec.components || {}).schemas || {};
  html.push("<h2>Schemas</h2><pre>" + esc(JSON.stringify(schemas, null, 2)) + "</pre>");
  document.getElementById("routes").innerHTML = html.join("");
}).catch(e => { document.getElementById("routes").textContent = "Could not read /openapi.json: " + e; });
document.getElementById("send").onclick = async () => {
  const out = document.getElementById("out"), key = document.getElementById("key").value;
  const headers = {"Content-Type": "application/json"};
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    const r = await fetch("v1/embeddings", {method: "POST", headers, body: document.getElementById("body").value});
    const j = await r.json();
    for (const d of (j.data || [])) if (Array.isArray(d.embedding)) d.embedding = d.embedding.slice(0, 8).concat(["..."]);
    out.textContent = r.status + "\\n" + JSON.stringify(j, null, 2);
  } catch (e) { out.textContent = String(e); }
};
</script>
</body></html>
"""


def docs_page(title: str) -> str:
    """The page for an app titled `title` (HTML-escaped here; the rest is static)."""
    import html

    return PAGE.replace("__TITLE__", html.escape(title))
