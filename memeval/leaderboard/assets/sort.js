/* Sortable tables: click (or Enter on) a header to sort by that column; click again to reverse.
   Cells sort on data-sort when present (numbers), else on their text. Empty values go last. */
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.tabIndex = 0;
  function key(row, i) {
    var c = row.cells[i];
    if (!c) return null;
    var v = c.hasAttribute("data-sort") ? c.getAttribute("data-sort") : c.textContent.trim();
    if (v === "") return null;
    return /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(v) ? parseFloat(v) : v.toLowerCase();
  }
  function sort() {
    var table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
    var asc = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th[aria-sort]").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    Array.prototype.slice.call(body.rows).map(function (r, n) { return [key(r, i), n, r]; })
      .sort(function (a, b) {
        if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
        var x = a[0], y = b[0];
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : a[1] - b[1]) * (x === y ? 1 : asc ? 1 : -1);
      })
      .forEach(function (t) { body.appendChild(t[2]); });
  }
  th.addEventListener("click", sort);
  th.addEventListener("keydown", function (e) {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
  });
});
