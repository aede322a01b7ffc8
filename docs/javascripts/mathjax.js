// MathJax 3 setup for pymdownx.arithmatex (generic mode): typeset \( \) and \[ \] inside .arithmatex,
// and again after each instant-navigation page change of mkdocs-material.
window.MathJax = {
  tex: { inline: [["\\(", "\\)"]], display: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
};

document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
