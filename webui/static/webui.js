// Page behaviour that needs the browser: A1111's keyboard shortcuts, and a notice when a typed
// number is out of range (Gradio silently clamps it to the slider's bounds).
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

  // Ctrl+Enter (or Cmd+Enter) generates, Alt+Enter skips the current image, Esc interrupts;
  // all act on the generation tab that is visible.
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
        const busy = document.querySelector(
          `#${tab}_progress .ldm-progress[data-state='running'], #${tab}_progress .ldm-progress[data-state='waiting']`,
        );
        if (busy) clickIn(tab, "interrupt");
      }
    },
    true,
  );

  // Out-of-range numbers: say what was typed and what is used instead.
  const notice = (text) => {
    let box = document.getElementById("ldm_notice");
    if (!box) {
      box = document.createElement("div");
      box.id = "ldm_notice";
      box.setAttribute("role", "alert");
      document.body.appendChild(box);
    }
    box.textContent = text;
    box.classList.add("ldm-notice-shown");
    clearTimeout(box._hide);
    box._hide = setTimeout(() => box.classList.remove("ldm-notice-shown"), 8000);
  };
  const checkRange = (e) => {
    const input = e.target;
    if (!(input instanceof HTMLInputElement) || input.type !== "number" || input.value === "") return;
    const value = Number(input.value);
    const min = input.min === "" ? -Infinity : Number(input.min);
    const max = input.max === "" ? Infinity : Number(input.max);
    if (!(value < min || value > max)) return;
    const block = input.closest(".block");
    const label = (block?.querySelector("[data-testid='block-info'], label")?.textContent || "This value").trim();
    const used = value < min ? min : max;
    notice(`${label}: ${value} is out of range (${input.min} to ${input.max}); using ${used} instead.`);
  };
  document.addEventListener("change", checkRange, true);
  document.addEventListener("keydown", (e) => e.key === "Enter" && checkRange(e), true);
})();
