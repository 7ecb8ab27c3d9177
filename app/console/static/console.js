// Live job progress: an element with data-live="URL" and data-active="1" is re-rendered from
// URL (an HTML fragment, same origin) every 2 s until the server answers X-Console-Active: 0.
(function () {
  "use strict";
  var INTERVAL_MS = 2000;

  function follow(element) {
    function poll() {
      fetch(element.getAttribute("data-live"), {
        credentials: "same-origin",
        cache: "no-store",
        headers: { "Accept": "text/html" },
      }).then(function (response) {
        // Signed out (redirected to sign-in) or gone: stop; the next reload says why.
        if (response.redirected || !response.ok) { return null; }
        var active = response.headers.get("X-Console-Active") === "1";
        return response.text().then(function (html) {
          element.innerHTML = html;
          element.setAttribute("data-active", active ? "1" : "0");
          if (active) { window.setTimeout(poll, INTERVAL_MS); }
        });
      }).catch(function () {
        window.setTimeout(poll, INTERVAL_MS * 2);  // a network blip: try again, slower
      });
    }
    window.setTimeout(poll, INTERVAL_MS);
  }

  document.querySelectorAll("[data-live][data-active='1']").forEach(follow);
})();
