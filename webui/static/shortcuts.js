// Keyboard shortcuts as in A1111: Ctrl+Enter (or Cmd+Enter) generates, Alt+Enter skips the
// current image, Esc interrupts. They act on the generation tab that is visible.
(() => {
  const TABS = ["txt2img", "img2img", "inpaint"];
  const visible = (id) => {
    const el = document.getElementById(id);
    return el && el.offsetParent !== null ? el : null;
  };
  const clickIn = (tab, what) => {
    const el = visible(`${tab}_${what}`);
    const button = el && (el.tagName === "BUTTON" ? el : el.querySelector("button"));
    if (button) button.click();
    return Boolean(button);
  };
  document.addEventListener(
    "keydown",
    (e) => {
      const tab = TABS.find((t) => visible(`${t}_generate`));
      if (!tab) return;
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        e.stopPropagation();
        // let a pending input event reach the textbox before the click reads it
        setTimeout(() => clickIn(tab, "generate"), 0);
      } else if (e.key === "Enter" && e.altKey) {
        e.preventDefault();
        clickIn(tab, "skip");
      } else if (e.key === "Escape") {
        if (document.querySelector(".ldm-progress[data-state='running'], .ldm-progress[data-state='waiting']")) {
          clickIn(tab, "interrupt");
        }
      }
    },
    true,
  );
})();
