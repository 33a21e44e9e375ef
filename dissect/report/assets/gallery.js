// Sort and filter the unit cards of a layer page. Plain JavaScript, no dependencies.
(function () {
  "use strict";
  var gallery = document.getElementById("gallery");
  if (!gallery) { return; }
  var cards = Array.prototype.slice.call(gallery.querySelectorAll(".card"));
  var sortBy = document.getElementById("sort");
  var category = document.getElementById("category");
  var text = document.getElementById("filter");
  var detectorsOnly = document.getElementById("detectors");
  var count = document.getElementById("count");

  function key(card, field) {
    var v = card.dataset[field];
    return field === "concept" || field === "category" ? v : parseFloat(v);
  }

  function apply() {
    var field = sortBy.value.replace(/-(asc|desc)$/, "");
    var desc = /-desc$/.test(sortBy.value);
    cards.sort(function (a, b) {
      var x = key(a, field), y = key(b, field);
      var order = x < y ? -1 : x > y ? 1 : key(a, "unit") - key(b, "unit");
      return desc ? -order : order;
    });
    var needle = text.value.trim().toLowerCase();
    var shown = 0;
    cards.forEach(function (card) {
      var ok = (!category.value || card.dataset.category === category.value) &&
        (!needle || card.dataset.concept.toLowerCase().indexOf(needle) >= 0 ||
         card.dataset.unit === needle) &&
        (!detectorsOnly.checked || card.dataset.detector === "1");
      card.hidden = !ok;
      if (ok) { shown += 1; }
      gallery.appendChild(card);
    });
    count.textContent = shown + " of " + cards.length + " units";
  }

  // a link may preset the controls: layer-x.html?sort=iou-asc&category=color&q=red&detectors=1
  var params = new URLSearchParams(window.location.search);
  if (params.get("sort")) { sortBy.value = params.get("sort"); }
  if (params.get("category")) { category.value = params.get("category"); }
  if (params.get("q")) { text.value = params.get("q"); }
  if (params.get("detectors")) { detectorsOnly.checked = params.get("detectors") === "1"; }

  [sortBy, category, detectorsOnly].forEach(function (el) { el.addEventListener("change", apply); });
  text.addEventListener("input", apply);
  apply();
}());
