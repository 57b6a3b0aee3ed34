// LogIX dashboard: live refresh of the projects table, and the query picker.
(function () {
  const report = document.body.dataset.mode === "report";
  document.querySelectorAll("select.query-select").forEach(function (select) {
    select.addEventListener("change", function () {
      if (report) {
        const page = select.closest("section") || document;
        page.querySelectorAll(".query-view").forEach(function (view) {
          view.hidden = view.dataset.query !== select.value;
        });
      } else {
        const target = select.dataset.target;
        location.href = target + (target.includes("?") ? "&" : "?") + "query=" + select.value;
      }
    });
  });
  const table = document.getElementById("projects");
  if (table && !report) {
    const human = function (n) {
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let i = 0;
      while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
      return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
    };
    const pad = function (n) { return String(n).padStart(2, "0"); };
    const stamp = function (t, now) {
      const d = new Date(t * 1000);
      const age = Math.max(now - t, 0);
      const ago = age < 120 ? age.toFixed(0) + " s ago" : age < 7200
        ? (age / 60).toFixed(0) + " min ago" : (age / 3600).toFixed(0) + " h ago";
      return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
        pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) + " (" + ago + ")";
    };
    const refresh = function () {
      fetch("/api/projects").then(function (r) { return r.json(); }).then(function (data) {
        const known = new Set();
        data.projects.forEach(function (row) {
          known.add(row.key);
          const tr = table.querySelector('tr[data-key="' + CSS.escape(row.key) + '"]');
          if (!tr || !!row.error !== !!tr.querySelector(".error-cell")) { location.reload(); return; }
          if (row.error) return;
          ["state", "rows", "width", "modules", "shards", "checkpoints"].forEach(function (f) {
            const td = tr.querySelector('td[data-field="' + f + '"]');
            if (td && td.textContent !== String(row[f])) td.textContent = String(row[f]);
          });
          const disk = tr.querySelector('td[data-field="disk"]');
          if (disk) disk.textContent = human(row.disk_bytes);
          const last = tr.querySelector('td[data-field="last write"]');
          if (last && row.last_write) last.textContent = stamp(row.last_write, data.time);
        });
        table.querySelectorAll("tr[data-key]").forEach(function (tr) {
          if (!known.has(tr.dataset.key)) location.reload();
        });
      }).catch(function () { /* server gone: keep the last table */ });
    };
    setInterval(refresh, 2000);
  }
})();
