// cxr-triage worklist page behaviour. Loaded from /static (the Content-Security-Policy allows no
// inline script). Worklist: j/k/Enter, pager, CSV export of the current filter, selection kept across
// the automatic refresh. Film page: zoom/pan, window/level, invert, heat map and lung outline toggles
// (off by default), keys A/D/N/P/H/L/I/R/Esc.
(function () {
  "use strict";
  var selectedSha = null;

  function rows() { return Array.prototype.slice.call(document.querySelectorAll("#worklist tbody tr[data-sha256]")); }

  function select(row) {
    rows().forEach(function (r) { r.classList.remove("selected"); });
    if (!row) { return; }
    row.classList.add("selected");
    selectedSha = row.getAttribute("data-sha256");
    row.scrollIntoView({ block: "nearest" });
  }

  function move(step) {
    var all = rows();
    if (!all.length) { return; }
    var index = all.findIndex(function (r) { return r.classList.contains("selected"); });
    index = index < 0 ? 0 : Math.min(Math.max(index + step, 0), all.length - 1);
    select(all[index]);
  }

  function open(row) {
    if (row) { window.location.href = "/films/" + row.getAttribute("data-sha256"); }
  }

  function typing(event) {
    var tag = (event.target && event.target.tagName) || "";
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT";
  }

  document.addEventListener("keydown", function (event) {
    if (!document.getElementById("worklist") || typing(event) || event.ctrlKey || event.metaKey || event.altKey) { return; }
    if (event.key === "j") { move(1); event.preventDefault(); }
    else if (event.key === "k") { move(-1); event.preventDefault(); }
    else if (event.key === "Enter") { open(document.querySelector("#worklist tr.selected")); }
  });

  // Filters changed (not by the pager): back to the first page. Capture phase runs before htmx's trigger.
  document.addEventListener("change", function (event) {
    var form = document.getElementById("filters");
    var offset = document.getElementById("offset");
    if (form && offset && form.contains(event.target) && event.target !== offset) { offset.value = "0"; }
  }, true);

  document.addEventListener("click", function (event) {
    var pager = event.target.closest && event.target.closest("button.page");
    if (pager) {
      document.getElementById("offset").value = pager.getAttribute("data-offset");
      window.htmx.trigger(document.getElementById("filters"), "submit");
      return;
    }
    if (event.target.id === "export") { exportCsv(); return; }
    var row = event.target.closest && event.target.closest("#worklist tbody tr[data-sha256]");
    if (row && !event.target.closest("a")) { select(row); }
  });

  // The CSV of the current filter: a native post of the filter form's fields (no patient data in the URL).
  function exportCsv() {
    var source = document.getElementById("filters");
    var form = document.createElement("form");
    form.method = "post";
    form.action = "/export.csv";
    new FormData(source).forEach(function (value, name) {
      var input = document.createElement("input");
      input.type = "hidden";
      input.name = name;
      input.value = value;
      form.appendChild(input);
    });
    document.body.appendChild(form);
    form.submit();
    form.remove();
  }

  document.addEventListener("htmx:afterSwap", function () {
    if (!selectedSha) { return; }
    var again = document.querySelector('#worklist tr[data-sha256="' + selectedSha + '"]');
    if (again) { again.classList.add("selected"); }
  });

  // The current filter's films in order, for N/P on the film page (no patient data: hashes only).
  function rememberOrder() {
    var shas = rows().map(function (r) { return r.getAttribute("data-sha256"); });
    if (shas.length) {
      try { window.sessionStorage.setItem("cxr-order", JSON.stringify(shas)); } catch (e) { /* storage off */ }
    }
  }
  document.addEventListener("htmx:afterSwap", rememberOrder);

  // Film page: zoom/pan, window/level (SVG filter), invert, overlays, keys.
  var view = { zoom: 1, x: 0, y: 0, width: 1, level: 0.5, invert: false, wlMode: false };

  function applyView() {
    var stack = document.getElementById("stack");
    if (!stack) { return; }
    stack.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.zoom + ")";
    var slope = (view.invert ? -1 : 1) / view.width;
    var intercept = view.invert ? 0.5 + view.level / view.width : 0.5 - view.level / view.width;
    document.querySelectorAll("#wl feFuncR, #wl feFuncG, #wl feFuncB").forEach(function (f) {
      f.setAttribute("slope", slope.toFixed(4));
      f.setAttribute("intercept", intercept.toFixed(4));
    });
    var readout = document.getElementById("wl-readout");
    if (readout) { readout.textContent = "W " + Math.round(view.width * 255) + " L " + Math.round(view.level * 255) + (view.zoom !== 1 ? " zoom " + view.zoom.toFixed(1) + "x" : ""); }
    var invert = document.getElementById("invert");
    if (invert) { invert.setAttribute("aria-pressed", String(view.invert)); }
  }

  function resetView() {
    view.zoom = 1; view.x = 0; view.y = 0; view.width = 1; view.level = 0.5; view.invert = false;
    applyView();
  }

  // The film fills the viewport at its own aspect ratio (larger or smaller than its pixels).
  function fitFilm() {
    var film = document.getElementById("film");
    var viewport = document.getElementById("viewport");
    if (!film || !viewport || !film.naturalWidth) { return; }
    var scale = Math.min(viewport.clientWidth / film.naturalWidth, viewport.clientHeight / film.naturalHeight);
    film.style.width = Math.floor(film.naturalWidth * scale) + "px";
    film.style.height = Math.floor(film.naturalHeight * scale) + "px";
  }

  function setupViewer() {
    var viewport = document.getElementById("viewport");
    if (!viewport) { return; }
    var drag = null;
    var film = document.getElementById("film");
    if (film.complete) { fitFilm(); }
    film.addEventListener("load", fitFilm);
    window.addEventListener("resize", fitFilm);
    viewport.addEventListener("contextmenu", function (e) { e.preventDefault(); });
    viewport.addEventListener("wheel", function (e) {
      e.preventDefault();
      var stack = document.getElementById("stack");
      var rect = stack.getBoundingClientRect();
      var factor = e.deltaY < 0 ? 1.15 : 1 / 1.15;
      var zoom = Math.min(Math.max(view.zoom * factor, 0.5), 12);
      // keep the point under the cursor still
      var px = (e.clientX - rect.left) / view.zoom, py = (e.clientY - rect.top) / view.zoom;
      view.x += px * (view.zoom - zoom);
      view.y += py * (view.zoom - zoom);
      view.zoom = zoom;
      applyView();
    }, { passive: false });
    viewport.addEventListener("mousedown", function (e) {
      var wl = e.button === 2 || view.wlMode;
      drag = { wl: wl, x: e.clientX, y: e.clientY, view: Object.assign({}, view) };
      e.preventDefault();
    });
    window.addEventListener("mousemove", function (e) {
      if (!drag) { return; }
      var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (drag.wl) {
        view.width = Math.min(Math.max(drag.view.width * Math.exp(dx / 200), 0.02), 2);
        view.level = Math.min(Math.max(drag.view.level - dy / 400, 0), 1);
      } else {
        view.x = drag.view.x + dx;
        view.y = drag.view.y + dy;
      }
      applyView();
    });
    window.addEventListener("mouseup", function () { drag = null; });
    var mode = document.getElementById("mode-wl");
    mode.addEventListener("click", function () {
      view.wlMode = !view.wlMode;
      mode.setAttribute("aria-pressed", String(view.wlMode));
      viewport.classList.toggle("wl", view.wlMode);
    });
    document.getElementById("invert").addEventListener("click", function () { view.invert = !view.invert; applyView(); });
    document.getElementById("reset-view").addEventListener("click", resetView);
    applyView();
  }

  function setupOverlay(toggleId, overlayId, label) {
    var toggle = document.getElementById(toggleId);
    var overlay = document.getElementById(overlayId);
    var status = document.getElementById("heatmap-status");
    if (!toggle || !overlay) { return; }
    toggle.checked = false;
    overlay.addEventListener("load", function () { status.textContent = ""; overlay.setAttribute("data-loaded", "1"); });
    overlay.addEventListener("error", function () { status.textContent = label + " unavailable"; });
    toggle.addEventListener("change", function () {
      if (toggle.checked && !overlay.getAttribute("src")) {
        status.textContent = "computing " + label + "...";
        overlay.setAttribute("src", overlay.getAttribute("data-src"));
      }
      overlay.hidden = !toggle.checked;
    });
  }

  function flip(id) {
    var toggle = document.getElementById(id);
    if (toggle) { toggle.checked = !toggle.checked; toggle.dispatchEvent(new Event("change")); }
  }

  function neighbour(step) {
    var layout = document.querySelector(".film-layout[data-sha256]");
    if (!layout) { return null; }
    var order = [];
    try { order = JSON.parse(window.sessionStorage.getItem("cxr-order") || "[]"); } catch (e) { order = []; }
    var index = order.indexOf(layout.getAttribute("data-sha256"));
    if (index < 0) { return null; }
    return order[index + step] || null;
  }

  function go(step) {
    var sha = neighbour(step);
    if (sha) { window.location.href = "/films/" + sha; }
  }

  function review(decision) {
    var layout = document.querySelector(".film-layout[data-sha256]");
    var button = document.getElementById(decision);
    if (!layout || !button) { return; }
    var token = JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRF-Token"];
    var note = document.getElementById("note");
    button.disabled = true;
    fetch("/api/films/" + layout.getAttribute("data-sha256") + "/review", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": token },
      body: JSON.stringify({ decision: decision, note: note && note.value ? note.value : null })
    }).then(function (response) {
      if (!response.ok) { throw new Error(String(response.status)); }
      var next = neighbour(1);
      window.location.href = next ? "/films/" + next : "/";
    }).catch(function (error) {
      button.disabled = false;
      document.getElementById("heatmap-status").textContent = "review not recorded (" + error.message + ")";
    });
  }

  document.addEventListener("keydown", function (event) {
    if (!document.querySelector(".film-layout") || typing(event) || event.ctrlKey || event.metaKey || event.altKey) { return; }
    var key = event.key;
    if (key === "Escape") { window.location.href = "/"; }
    else if (key === "n" || key === "N") { go(1); }
    else if (key === "p" || key === "P") { go(-1); }
    else if (key === "a" || key === "A") { review("agree"); }
    else if (key === "d" || key === "D") { review("disagree"); }
    else if (key === "h" || key === "H") { flip("heatmap-toggle"); }
    else if (key === "l" || key === "L") { flip("lungs-toggle"); }
    else if (key === "i" || key === "I") { view.invert = !view.invert; applyView(); }
    else if (key === "r" || key === "R") { resetView(); }
    else { return; }
    event.preventDefault();
  });

  document.addEventListener("DOMContentLoaded", function () {
    setupViewer();
    setupOverlay("heatmap-toggle", "heatmap", "heat map");
    setupOverlay("lungs-toggle", "lungs", "lung outline");
    var prev = document.getElementById("prev-film");
    var next = document.getElementById("next-film");
    if (prev && next) {
      prev.disabled = !neighbour(-1);
      next.disabled = !neighbour(1);
      prev.addEventListener("click", function () { go(-1); });
      next.addEventListener("click", function () { go(1); });
    }
    rememberOrder();
    var first = rows()[0];
    if (first) { select(first); }
  });
})();
