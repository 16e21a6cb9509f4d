# units/NAME.unit.json as NixOS unit attribute sets: { unit, service, socket, install }, each
# `Key = value` (or a list where a directive repeats). Builtins only, so tests/test_nix.py can
# evaluate it without nixpkgs and compare it with units/NAME.service.
{ substitute ? (value: value)
, name ? "hivemind-worker"
, spec ? builtins.fromJSON (builtins.readFile (../units + "/${name}.unit.json"))
}:

let
  # Entries without a key are comments; debian_only ones are replaced by module options.
  directives = builtins.filter (e: e ? key && !(e.debian_only or false)) spec.directives;
  inSection = section: builtins.filter (e: e.section == section) directives;
  valuesOf = e: map substitute (if builtins.isList e.value then e.value else [ e.value ]);

  toDirectives = entries:
    let
      keys = builtins.foldl' (acc: e: if builtins.elem e.key acc then acc else acc ++ [ e.key ]) [ ] entries;
      collect = key: builtins.concatLists (map valuesOf (builtins.filter (e: e.key == key) entries));
      single = key: let values = collect key; in
        if builtins.length values == 1 then builtins.head values else values;
    in
    builtins.listToAttrs (map (key: { name = key; value = single key; }) keys);
in
{
  unit = toDirectives (inSection "Unit");
  service = toDirectives (inSection "Service");
  socket = toDirectives (inSection "Socket");
  install = toDirectives (inSection "Install");
}
