// cxr-triage worklist page behaviour. Loaded from /static (the Content-Security-Policy allows no
// inline script). Worklist: j/k/Enter, pager, CSV export of the current filter, selection kept across
// the automatic refresh. Film page: brightness/contrast, Grad-CAM overlay toggle (off by default).
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

  // Film page.
  function applyView() {
    var film = document.getElementById("film");
    if (!film) { return; }
    var b = document.getElementById("brightness").value;
    var c = document.getElementById("contrast").value;
    film.style.filter = "brightness(" + b + "%) contrast(" + c + "%)";
  }

  document.addEventListener("input", function (event) {
    if (event.target.id === "brightness" || event.target.id === "contrast") { applyView(); }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var reset = document.getElementById("reset-view");
    if (reset) {
      reset.addEventListener("click", function () {
        document.getElementById("brightness").value = 100;
        document.getElementById("contrast").value = 100;
        applyView();
      });
    }
    var toggle = document.getElementById("heatmap-toggle");
    var overlay = document.getElementById("heatmap");
    var status = document.getElementById("heatmap-status");
    if (toggle && overlay) {
      toggle.checked = false;
      overlay.addEventListener("load", function () { status.textContent = ""; overlay.setAttribute("data-loaded", "1"); });
      overlay.addEventListener("error", function () { status.textContent = "overlay unavailable"; });
      toggle.addEventListener("change", function () {
        if (toggle.checked && !overlay.getAttribute("src")) {
          status.textContent = "computing overlay...";
          overlay.setAttribute("src", overlay.getAttribute("data-src"));
        }
        overlay.hidden = !toggle.checked;
      });
    }
    var first = rows()[0];
    if (first) { select(first); }
  });
})();
