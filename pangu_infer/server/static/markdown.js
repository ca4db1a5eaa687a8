// Markdown -> HTML for chat replies: fenced code, headings, lists, quotes, tables, rules, and
// inline code, bold, italic, strikethrough and links. Every piece of the input is HTML-escaped
// before any tag is added, so the output holds only the tags written here; links keep only
// http(s) and mailto addresses.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])(\s+|$)(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

/** The HTML for `text` (a whole reply, or the part streamed so far). */
export function renderMarkdown(text) {
  // \u0000 marks placeholders below; the input may not carry its own.
  const lines = text.replace(/\r\n?/g, "\n").replace(/\u0000/g, "\uFFFD").split("\n");
  return renderBlocks(lines);
}

function renderBlocks(lines) {
  const out = [];
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(renderInline).join("<br>")}</p>`);
    paragraph = [];
  };
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      flush();
      const close = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++; // the closing fence (or the end of a reply still streaming)
      out.push(codeBlock(body.join("\n"), m[2]));
    } else if (!line.trim()) {
      flush();
      i++;
    } else if ((m = HEADING.exec(line))) {
      flush();
      const level = m[1].length;
      out.push(`<h${level}>${renderInline(m[2] || "")}</h${level}>`);
      i++;
    } else if (RULE.test(line)) {
      flush();
      out.push("<hr>");
      i++;
    } else if (QUOTE.test(line)) {
      flush();
      const body = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) body.push(m[1]);
      out.push(`<blockquote>${renderBlocks(body)}</blockquote>`);
    } else if (LIST_ITEM.test(line)) {
      flush();
      i = renderList(lines, i, out);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      flush();
      i = renderTable(lines, i, out);
    } else {
      paragraph.push(line);
      i++;
    }
  }
  flush();
  return out.join("");
}

function codeBlock(code, info) {
  const language = (info.match(/^[\w+#.-]{1,30}/) || [""])[0];
  const label = language ? `<span class="code-lang">${escapeHtml(language)}</span>` : "<span></span>";
  return (
    `<div class="code-block"><div class="code-head">${label}` +
    `<button type="button" class="copy-code">Copy</button></div>` +
    `<pre><code>${escapeHtml(code)}</code></pre></div>`
  );
}

function indentOf(line) {
  return line.length - line.trimStart().length;
}

// A list starting at lines[start]: items at its indent, each item's own lines (continuations,
// nested lists, code) rendered as blocks. Returns the index after the list.
function renderList(lines, start, out) {
  const first = LIST_ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const items = [];
  let i = start;
  while (i < lines.length) {
    const line = lines[i];
    const m = LIST_ITEM.exec(line);
    if (m && m[1].length === indent && /\d/.test(m[2]) === ordered && !RULE.test(line)) {
      items.push({ lines: [m[4]], contentIndent: indent + m[2].length + Math.max(1, m[3].length) });
      i++;
      continue;
    }
    const item = items[items.length - 1];
    if (!line.trim()) {
      // a blank line continues the list only if the next line belongs to it
      const next = lines[i + 1];
      if (next === undefined || !next.trim() || (indentOf(next) <= indent && !LIST_ITEM.test(next))) break;
      const nextItem = LIST_ITEM.exec(next);
      if (nextItem && nextItem[1].length < indent) break;
      item.lines.push("");
      i++;
    } else if (indentOf(line) > indent) {
      item.lines.push(line.slice(Math.min(indentOf(line), item.contentIndent)));
      i++;
    } else if (!m && !FENCE.test(line) && !HEADING.test(line) && !QUOTE.test(line) && item.lines[item.lines.length - 1].trim()) {
      item.lines.push(line.trim()); // a lazy continuation of the item's paragraph
      i++;
    } else {
      break;
    }
  }
  const tag = ordered ? "ol" : "ul";
  const startNumber = ordered ? parseInt(first[2], 10) : 1;
  const startAttr = ordered && startNumber !== 1 ? ` start="${startNumber}"` : "";
  const html = items.map((item) => {
    const body = renderBlocks(item.lines);
    // tight items: one paragraph shows without its <p> margins
    const tight = body.startsWith("<p>") && body.indexOf("<p>", 1) < 0;
    return `<li>${tight ? body.replace(/^<p>([\s\S]*?)<\/p>/, "$1") : body}</li>`;
  });
  out.push(`<${tag}${startAttr}>${html.join("")}</${tag}>`);
  return i;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function renderTable(lines, start, out) {
  const header = splitRow(lines[start]);
  const aligns = splitRow(lines[start + 1]).map((cell) =>
    cell.startsWith(":") && cell.endsWith(":") ? "center" : cell.endsWith(":") ? "right" : cell.startsWith(":") ? "left" : ""
  );
  const cell = (tag, text, k) => {
    const align = aligns[k] ? ` style="text-align:${aligns[k]}"` : "";
    return `<${tag}${align}>${renderInline(text)}</${tag}>`;
  };
  const rows = [];
  let i = start + 2;
  for (; i < lines.length && lines[i].trim() && lines[i].includes("|"); i++) {
    const cells = splitRow(lines[i]);
    rows.push(`<tr>${header.map((_, k) => cell("td", cells[k] || "", k)).join("")}</tr>`);
  }
  out.push(
    `<div class="table-wrap"><table><thead><tr>${header.map((h, k) => cell("th", h, k)).join("")}</tr></thead>` +
      `<tbody>${rows.join("")}</tbody></table></div>`
  );
  return i;
}

const SAFE_URL = /^(https?:\/\/|mailto:)/i;

function link(url, label) {
  return `<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${escapeHtml(label)}</a>`;
}

/** One line of text: code spans stay literal; the rest is escaped, then marked up. */
export function renderInline(text) {
  const held = []; // finished HTML pieces, put back at the end so later rules cannot touch them
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  let s = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => hold(`<code>${escapeHtml(code.trim() || code)}</code>`));
  s = s.replace(/\[([^\]\u0000]+)\]\(\s*([^\s()]+)\s*\)/g, (whole, label, url) => (SAFE_URL.test(url) ? hold(link(url, label)) : whole));
  s = s.replace(/\bhttps?:\/\/[^\s<>"'\u0000]*[^\s<>"'.,;:!?)\]\u0000]/g, (url) => hold(link(url, url)));
  s = escapeHtml(s);
  s = s.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>");
  s = s.replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
  s = s.replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
  return s.replace(/\u0000(\d+)\u0000/g, (_, k) => held[Number(k)]);
}
