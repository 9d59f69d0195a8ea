// The relay console's only script (no inline script is allowed by the page's CSP). Pages
// work without it; it adds the overview's refresh and the replay progress bar.
"use strict";

// Overview: fetch the live part again every N seconds while the tab is visible.
document.querySelectorAll("[data-refresh]").forEach((region) => {
  const every = Number(region.dataset.refresh) * 1000;
  setInterval(async () => {
    if (document.hidden) return;
    try {
      const res = await fetch(location.href, {
        headers: { "X-Console-Fragment": "1" },
        credentials: "same-origin",
      });
      if (res.ok) region.innerHTML = await res.text();
      else if (res.status === 401) location.reload();
    } catch (_) {
      // Offline for a moment: the next tick tries again.
    }
  }, every);
});

// Replay confirmation: move the jobs in batches and show how far it got.
document.querySelectorAll("form[data-batch-replay]").forEach((form) => {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const total = Number(form.dataset.batchReplay);
    const bar = form.querySelector("progress");
    const status = form.querySelector("[role=status]");
    const button = form.querySelector("button[type=submit]");
    form.querySelector(".progress").hidden = false;
    button.disabled = true;
    let done = 0;
    while (done < total) {
      const body = new URLSearchParams(new FormData(form));
      body.set("batch", "1");
      body.set("done", String(done));
      const res = await fetch(form.action, { method: "POST", body, credentials: "same-origin" });
      if (!res.ok) {
        status.textContent = "Stopped: the relay answered " + res.status + " after " + done + " job(s).";
        button.disabled = false;
        return;
      }
      const moved = (await res.json()).moved;
      if (moved === 0) break;
      done += moved;
      bar.value = done;
      status.textContent = "Replayed " + done + " of " + total + "…";
    }
    location.assign("/console/parked?replayed=" + done);
  });
});
